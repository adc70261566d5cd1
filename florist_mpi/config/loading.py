"""Loading a config: YAML text or file, `--set key.path=value` overrides, one-line errors."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from florist_mpi.config.base import ConfigError
from florist_mpi.config.experiment import ExperimentConfig


def _apply_override(tree: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set '{assignment}' is not of the form key.path=value")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set '{assignment}' has an empty key")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = raw


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{key}': remove it or check its spelling (docs/configuration.md lists the keys)"
    msg = msg.removeprefix("Value error, ")
    value = first.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
    return f"invalid config value for '{key}'{shown}: {msg}"


def config_from_tree(tree: Any, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError("the config must be a YAML mapping of sections (run:, federation:, ...)")
    tree = copy.deepcopy(tree)
    for assignment in overrides:
        _apply_override(tree, assignment)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def parse_config_text(text: str, overrides=(), source: str = "config") -> ExperimentConfig:
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source} is not valid YAML{where}: fix the syntax") from None
    return config_from_tree(tree, overrides)


def load_config(path: str | Path, overrides=()) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found: pass the path of a YAML config (see configs/)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file '{path}': {err.__class__.__name__}") from None
    return parse_config_text(text, overrides, source=f"config file '{path}'")


# Keys that must match between a log and a config used to resume it.
