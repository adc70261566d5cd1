"""Instruction data from JSON files: a JSON array or JSON Lines, normalised to the Dolly fields.

Records are dicts with string fields `instruction`, `context`, `response` and `category`.
"""
from __future__ import annotations

import json
from pathlib import Path

from florist_mpi.config import DataConfig
from florist_mpi.data.common import DataError

EVAL_FILE_NAME = "global_test.json"
DEFAULT_CATEGORY = "none"


def load_json_records(path: str | Path, category_field: str = "category") -> list[dict]:
    """Records of a JSON array or JSON Lines file, normalised to the Dolly fields.

    Alpaca names are accepted (`input` for `context`, `output` for `response`); the category
    comes from `category_field`, else `category`, else `class` (MMLU), else "none".
    An empty list is returned as is; callers decide whether that is an error.
    """
    path = Path(path)
    values = _parse_records_text(_read_text(path), path)
    return [_normalise_record(value, index, path, category_field) for index, value in enumerate(values)]


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"data file '{path}' not found: check the path (relative paths start at the working directory)")
    if not path.is_file():
        raise DataError(f"'{path}' is a directory, not a data file: point at a .json/.jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"data file '{path}' is not UTF-8 text: re-save it as UTF-8 JSON") from None
    except OSError as err:
        raise DataError(f"cannot read data file '{path}' ({err.strerror}): check its permissions") from None
    if not text.strip():
        raise DataError(f"data file '{path}' is empty: fill it with a JSON list of records or JSON Lines")
    return text


def _looks_like_json_lines(text: str) -> bool:
    """JSON Lines: the first line alone is a complete JSON object."""
    first_line = text.lstrip().split("\n", 1)[0]
    try:
        return isinstance(json.loads(first_line), dict)
    except json.JSONDecodeError:
        return False


def _parse_records_text(text: str, path: Path) -> list:
    if _looks_like_json_lines(text):
        return _parse_json_lines(text, path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"data file '{path}' is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}; "
            "fix the syntax there"
        ) from None
    if not isinstance(value, list):
        raise DataError(
            f"data file '{path}' holds a JSON {_json_type(value)} at the top level: it must be a list of "
            'records ([{"instruction": ..., "response": ...}, ...]) or JSON Lines'
        )
    return value


def _parse_json_lines(text: str, path: Path) -> list:
    values = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(
                f"data file '{path}' (JSON Lines) is not valid JSON at line {line_number}, column {err.colno}: "
                f"{err.msg}; fix that line"
            ) from None
    return values


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _field(raw: dict, names: tuple[str, ...]) -> tuple[str, object]:
    """(name, value) of the first of `names` the record sets; value None if none is set."""
    for name in names:
        if raw.get(name) is not None:
            return name, raw[name]
    return names[0], None


def _normalise_record(raw, index: int, path: Path, category_field: str) -> dict:
    """The four Dolly fields of record `index` (0-based), or a DataError naming what is wrong."""
    if not isinstance(raw, dict):
        raise DataError(
            f"data file '{path}': record {index} is a JSON {_json_type(raw)}, not an object: "
            "every record must be an object with 'instruction' and 'response' fields"
        )
    sources = {
        "instruction": ("instruction",),
        "context": ("context", "input"),
        "response": ("response", "output"),
        "category": (category_field, "category", "class"),
    }
    record = {}
    for field, names in sources.items():
        name, value = _field(raw, names)
        if value is None and field in ("instruction", "response"):
            alias = f" (or its alias '{names[1]}')" if len(names) > 1 else ""
            raise DataError(f"data file '{path}': record {index} has no '{field}' field{alias}: add it to that record")
        if value is not None and not isinstance(value, str):
            raise DataError(
                f"data file '{path}': record {index} field '{name}' is a JSON {_json_type(value)}: make it a string"
            )
        record[field] = value if value is not None else ("" if field == "context" else DEFAULT_CATEGORY)
    return record


def client_files(directory: Path, pattern: str, num_clients: int, category_field: str) -> list[list[dict]]:
    if not directory.is_dir():
        what = "is a file" if directory.exists() else "not found"
        raise DataError(
            f"data.path '{directory}' {what}: with data.partition 'files' it must be a directory holding "
            f"{pattern.format(client=0)} ... (or set data.partition to iid/dirichlet for one file)"
        )
    clients = []
    for client in range(num_clients):
        path = directory / pattern.format(client=client)
        if not path.is_file():
            raise DataError(
                f"client file '{path}' not found: {directory} must hold one file per client for "
                f"{num_clients} clients; add it or lower federation.num_clients"
            )
        records = load_json_records(path, category_field)
        if not records:
            raise DataError(f"client {client} has no examples: '{path}' is an empty list; add records to it")
        clients.append(records)
    return clients


def eval_path(cfg: DataConfig) -> Path:
    if cfg.eval_path:
        return Path(cfg.eval_path)
    data_path = Path(cfg.path)
    folder = data_path if data_path.is_dir() else data_path.parent
    candidate = folder / EVAL_FILE_NAME
    if candidate.is_file():
        return candidate
    raise DataError(
        f"no held-out data for data.path '{cfg.path}': set data.eval_path (or eval.path) to a JSON file "
        f"or put {EVAL_FILE_NAME} in '{folder}'"
    )
