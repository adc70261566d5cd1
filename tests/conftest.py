"""Shared helpers: launching real MPI jobs from tests."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def mpiexec_path() -> str | None:
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


def mpi_command(n: int, *args: str) -> list[str]:
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("no mpiexec on PATH")
    flags = ["--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.insert(0, "--allow-run-as-root")
    return [exe, *flags, "-n", str(n), *args]


def mpi_env(tmp_path: Path | None = None) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    # Keep Open MPI from probing network interfaces it cannot use in a sandbox.
    env.setdefault("OMPI_MCA_btl", "self,vader,tcp")
    env.setdefault("OMPI_MCA_btl_tcp_if_include", "lo")
    env.setdefault("OMPI_MCA_oob_tcp_if_include", "lo")
    return env


def run_mpi(n: int, args: list[str], *, timeout: float = 600, env: dict | None = None, cwd=None):
    command = mpi_command(n, *args)
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env or mpi_env(), cwd=cwd or REPO
    )


def florist_cli() -> list[str]:
    return [sys.executable, "-m", "florist_mpi.cli"]


@pytest.fixture
def mpi():
    return run_mpi
