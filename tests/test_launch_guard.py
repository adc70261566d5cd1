"""The launch guard of `florist-mpi run`: N tasks started by a launcher whose MPI world has
size 1 (srun --mpi=pmi2 or none with an Open MPI 5 build) are refused before any work.
The launchers are faked through their environment variables; tests/test_slurm.py does
the same on a live Slurm."""
from __future__ import annotations

import os
import subprocess

import pytest
from conftest import REPO, florist_cli

from florist_mpi import comm
from florist_mpi.errors import UserError
from florist_mpi.runner import check_launch

LAUNCHERS = [
    # (environment, expected LaunchSize or None), as each launcher sets it
    ({}, None),  # plain `florist-mpi run`
    ({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}, None),  # inside `sbatch -n 4` / salloc, no srun step
    (
        {"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"},
        comm.LaunchSize(2, "SLURM_STEP_NUM_TASKS"),
    ),
    (
        {"PMI_SIZE": "2", "PMI_RANK": "1", "SLURM_STEP_NUM_TASKS": "2"},
        comm.LaunchSize(2, "PMI_SIZE"),
    ),  # srun --mpi=pmi2
    ({"OMPI_COMM_WORLD_SIZE": "4", "SLURM_NTASKS": "4"}, comm.LaunchSize(4, "OMPI_COMM_WORLD_SIZE")),  # mpirun
    # mpirun -n 1 inside a 2-task step: Open MPI's own count wins over the step's
    ({"OMPI_COMM_WORLD_SIZE": "1", "SLURM_STEP_NUM_TASKS": "2"}, comm.LaunchSize(1, "OMPI_COMM_WORLD_SIZE")),
    ({"SLURM_STEP_NUM_TASKS": "two"}, None),  # unreadable: no verdict rather than a wrong one
]


@pytest.mark.parametrize("environ, expected", LAUNCHERS)
def test_launcher_size_reads_the_most_specific_variable(environ, expected):
    assert comm.launcher_size(environ) == expected


@pytest.mark.parametrize("environ, expected", LAUNCHERS)
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_only_a_larger_launch_than_the_world_of_one_is_refused(environ, expected, world_size):
    refused = world_size == 1 and expected is not None and expected.tasks > 1
    if not refused:
        check_launch(world_size, environ)
        return
    with pytest.raises(UserError) as caught:
        check_launch(world_size, environ)
    message = UserError.one_line(caught.value)
    assert f"started {expected.tasks} tasks ({expected.variable}={expected.tasks})" in message
    assert "world of 1 process" in message and "srun --mpi=pmix" in message and "mpirun" in message


def clean_env(**launcher: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "PMI_", "PMIX_", "OMPI_COMM_WORLD", "OMPI_WORLD", "OMPI_UNIVERSE"))
    }
    env.update(PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **launcher)
    return env


@pytest.mark.parametrize(
    "launcher",
    [{"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2"}, {"OMPI_COMM_WORLD_SIZE": "3"}],
    ids=["srun-step", "mpirun"],
)
def test_cli_refuses_with_one_line_and_writes_nothing(tmp_path, launcher):
    log = tmp_path / "runs" / "demo.h5"
    result = subprocess.run(
        [*florist_cli(), "run", "configs/demo.yaml", "--set", f"run.output={log}"],
        cwd=REPO,
        env=clean_env(**launcher),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("florist-mpi: error: the launcher started"), result.stderr
    assert result.stdout == ""
    assert not log.parent.exists()


def test_cli_refusal_leaves_an_existing_log_untouched(tmp_path):
    log = tmp_path / "kept.h5"
    log.write_bytes(b"an earlier run's log")
    result = subprocess.run(
        [*florist_cli(), "run", "configs/demo.yaml", "--set", f"run.output={log}", "--overwrite"],
        cwd=REPO,
        env=clean_env(SLURM_STEP_NUM_TASKS="4"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "SLURM_STEP_NUM_TASKS=4" in result.stderr
    assert log.read_bytes() == b"an earlier run's log"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.h5"]


def test_one_process_inside_a_batch_script_is_not_refused(tmp_path):
    """`sbatch -n 2 --wrap 'florist-mpi run ...'` (no srun) is one process: it gets past the guard
    to the config check (a config error here, so that nothing runs)."""
    result = subprocess.run(
        [*florist_cli(), "run", str(tmp_path / "missing.yaml")],
        cwd=REPO,
        env=clean_env(SLURM_NTASKS="2", SLURM_JOB_ID="7"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "missing.yaml" in result.stderr and "launcher" not in result.stderr
