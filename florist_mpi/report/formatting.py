"""Plain-text helpers of `report` (and `sweep-tau`, `compare-methods`): run labels, number and byte formats,
aligned tables, the --plots folder."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from florist_mpi.errors import UserError


def plots_dir(path) -> Path:
    """The --plots folder, created if missing; a one-line error when it cannot be."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--plots '{path}' exists and is not a directory: give a directory for the PNG files")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"cannot create --plots directory '{path}' ({err.strerror}): choose a writable location"
        ) from None
    return path


def run_labels(paths: list[Path]) -> list[str]:
    """Short unique names: the file stem, with as many parent folders as needed to tell runs apart."""
    parts = [Path(p).with_suffix("").parts for p in paths]
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(p) for p in parts):
            break
        depth += 1
    # still equal (the same file given twice): number them
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return unique


def short_module_names(modules: list[str]) -> list[str]:
    """Drop the dotted prefix every module shares ('model.layers.'), keeping the word before a layer number."""
    if len(modules) < 2:
        return list(modules)
    split = [m.split(".") for m in modules]
    common = 0
    while all(len(s) > common + 1 and s[common] == split[0][common] for s in split):
        common += 1
    if common and any(s[common].isdigit() for s in split):
        common -= 1  # 'layers.3.self_attn.q_proj' rather than '3.self_attn.q_proj'
    return [".".join(s[common:]) for s in split]


def byte_unit(largest: float) -> tuple[float, str]:
    """The (divisor, name) of the unit that shows `largest` bytes with at most three integer digits or so."""
    for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if largest >= scale:
            return scale, name
    return 1.0, "B"


def format_number(value, digits: int = 4) -> str:
    """An integer as is, a float with `digits` decimals; '-' for a missing or non-finite value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.{digits}f}"


def format_scaled_bytes(value: float) -> str:
    """A byte amount already scaled to its unit: three significant digits or so."""
    if not math.isfinite(value):
        return "-"
    if value >= 100:
        return f"{value:.1f}"
    if value >= 10:
        return f"{value:.2f}"
    return f"{value:.3f}"


def format_table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Columns padded to their widest cell; the first `left` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]

    def line(cells):
        out = [str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])
