"""What the benchmarks share: the command line of one `florist-mpi run` on N ranks."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def mpiexec(ranks: int) -> list[str]:
    """The launcher prefix for `ranks` MPI ranks (none for one rank or without mpiexec)."""
    exe = Path(sys.executable).parent / "mpiexec"
    exe = str(exe) if exe.exists() else shutil.which("mpiexec")
    if exe is None or ranks == 1:
        return []
    root = ["--allow-run-as-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    return [exe, *root, "--oversubscribe", "-n", str(ranks)]


def run_command(config, settings: dict, ranks: int) -> list[str]:
    """`florist-mpi run CONFIG --overwrite --set KEY=VALUE ...` under this interpreter on `ranks` ranks."""
    overrides = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
    return [*mpiexec(ranks), sys.executable, "-m", "florist_mpi.cli", "run", str(config), "--overwrite", *overrides]
