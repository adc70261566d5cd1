"""The key tables of docs/configuration.md, generated from the pydantic models in florist_mpi/config/.

Each key's meaning is its `Field(description=...)`; its default and whether it is a
stable contract (`json_schema_extra=CONTRACT`) come from the same field. The doc keeps
its prose by hand; each section's table sits between the markers
`<!-- config:SECTION -->` and `<!-- /config:SECTION -->` and is rewritten by

    python -m florist_mpi.configdoc            # rewrite docs/configuration.md
    python -m florist_mpi.configdoc --check    # exit 1 if it is out of date

(tests/test_config.py runs the check).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pydantic import BaseModel

from florist_mpi.config import ExperimentConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
MARKER = re.compile(r"(<!-- config:(\w+) -->\n)(.*?)(<!-- /config:\2 -->)", re.DOTALL)


def section_model(name: str) -> type[BaseModel]:
    """The pydantic model of a top-level section (`federation` -> FederationConfig)."""
    annotation = ExperimentConfig.model_fields[name].annotation
    # `system: SystemConfig | None`: the model inside the optional
    models = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
    return next(a for a in models if issubclass(a, BaseModel))


def _default(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, list):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    if isinstance(value, float):  # 0.0, 1.0, 0.003, 1e12
        return f"{value:.1f}" if value.is_integer() and abs(value) < 1e6 else f"{value:g}".replace("e+", "e")
    return str(value)


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, meaning) of every key of a section, nested sections flattened (`tiny.vocab_size`)."""
    found = []
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):  # a nested section (model.tiny, data.synthetic): one row per key
            found += rows(type(default), prefix=f"{prefix}{name}.")
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        key = f"`{prefix}{name}`" + (" (contract)" if extra.get("contract") else "")
        found.append((key, _default(default), field.description or ""))
    return found


def section_table(section: str) -> str:
    """The markdown table of one top-level section's keys."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| {key} | {default} | {meaning} |" for key, default, meaning in rows(section_model(section))]
    return "\n".join(lines) + "\n"


def render(text: str) -> str:
    """`text` with every marked table regenerated; every config section must have its markers."""
    found = set()

    def table(match: re.Match) -> str:
        found.add(match.group(2))
        return match.group(1) + section_table(match.group(2)) + match.group(4)

    result = MARKER.sub(table, text)
    missing = [name for name in ExperimentConfig.model_fields if name not in found]
    if missing:
        raise ValueError(f"no <!-- config:NAME --> table for section(s) {', '.join(missing)}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the doc is out of date, write nothing")
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    text = args.doc.read_text()
    wanted = render(text)
    if args.check:
        if wanted != text:
            print(f"{args.doc} is out of date: run python -m florist_mpi.configdoc", file=sys.stderr)
            return 1
        return 0
    args.doc.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
