"""The MPI exchange moves factors bit-exactly, including the chunked path for >2 GiB."""
import sys

import pytest
from conftest import REPO, mpi_env, run_mpi

from florist_mpi.comm import INT_MAX, gather_step_elements

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("ranks, chunk", [(1, 5), (3, 5), (3, 1), (2, 1 << 28)])
def test_gather_and_broadcast_are_exact(ranks, chunk):
    env = mpi_env()
    env["CHUNK"] = str(chunk)
    env["FLORIST_MPI_CHUNK_ELEMENTS"] = str(chunk)
    result = run_mpi(
        ranks, [sys.executable, "-m", "mpi4py", str(REPO / "tests/mpi_scripts/exchange_check.py")], env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(" ok") == ranks


def test_gather_steps_keep_rank_zero_displacements_within_int():
    for size in (1, 2, 9, 64, 4096):
        step = gather_step_elements(1 << 28, size)
        assert 1 <= step <= 1 << 28 and step * size <= INT_MAX
    assert gather_step_elements(5, 3) == 5
