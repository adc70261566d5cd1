"""What the benchmarks share: the command line of one `florist-mpi run` on N ranks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
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


def run_labelled(label: str, config, settings: dict, ranks: int, cwd: Path) -> float:
    """Run one `florist-mpi run` to completion, print and return its wall seconds; a failed run ends the benchmark."""
    start = time.perf_counter()
    result = subprocess.run(run_command(config, settings, ranks), cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{label} failed:\n{result.stderr[-3000:]}")
    wall = time.perf_counter() - start
    print(f"  {label:<14} done in {wall:6.1f}s (wall)", flush=True)
    return wall
