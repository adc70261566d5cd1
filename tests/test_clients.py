"""The clients a rank hosts: participation and the per-rank share of the work."""
import sys

import pytest
from conftest import REPO, mpi_env, run_mpi

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("ranks", [1, 3])
def test_each_candidate_is_counted_on_one_rank_only(ranks):
    """With a system section, token counts for the clock come from each rank's own share (issue 18)."""
    result = run_mpi(
        ranks, [sys.executable, "-m", "mpi4py", str(REPO / "tests/mpi_scripts/counts_check.py")], env=mpi_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(" ok") == ranks
