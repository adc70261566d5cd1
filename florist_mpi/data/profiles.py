"""Per-client device and link profiles read from CSV files (the simulated clock's `system` section)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from florist_mpi.data.common import DataError


def system_tables(system, num_clients: int) -> dict[str, np.ndarray]:
    """The columns of `system` keys given as {csv: PATH}: key -> float64 value per client.

    The file has a header row and one row per client, client 0 first; the column is named
    like the key (or `column:`). Values must be positive (`latency_s`: zero or positive).
    """
    import csv

    from florist_mpi.config import PROFILE_KEYS, CsvProfile

    tables = {}
    for key in PROFILE_KEYS:
        spec = getattr(system, key)
        if not isinstance(spec, CsvProfile):
            continue
        path, column = Path(spec.csv), spec.column or key
        where = f"system.{key}: CSV '{path}'"
        if not path.is_file():
            raise DataError(f"{where} not found: give the path of a CSV file with one row per client")
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
                header = rows[0].keys() if rows else []
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise DataError(f"{where} cannot be read ({err.__class__.__name__}): check the file") from None
        if rows and column not in header:
            raise DataError(
                f"{where} has no column '{column}' (columns: {', '.join(header)}): add it or set system.{key}.column"
            )
        if len(rows) != num_clients:
            raise DataError(
                f"{where} has {len(rows)} rows but federation.num_clients is {num_clients}: "
                "give one row per client (after the header)"
            )
        values = np.empty(num_clients)
        for index, row in enumerate(rows):
            text = (row.get(column) or "").strip()
            try:
                values[index] = float(text)
            except ValueError:
                raise DataError(f"{where} row {index + 2}: '{text}' in column '{column}' is not a number") from None
            low_ok = values[index] >= 0 if key == "latency_s" else values[index] > 0
            if not (math.isfinite(values[index]) and low_ok):
                need = "zero or positive" if key == "latency_s" else "positive"
                raise DataError(f"{where} row {index + 2}: {column} = {text} must be {need}")
        tables[key] = values
    return tables
