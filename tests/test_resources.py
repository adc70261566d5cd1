"""Per-rank figures of a round, progress lines and short summaries (issues 19 and 24)."""
from __future__ import annotations

import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, mpi_env, run_mpi

from florist_mpi import console, resources


def test_peak_rss_is_reset_per_round_on_linux():
    memory = resources.PeakMemory(torch.device("cpu"))
    if not memory.per_round:
        pytest.skip("this system cannot reset the peak resident memory")
    memory.start_round()
    before = memory.peak_rss_bytes()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB touched
    grown = memory.peak_rss_bytes()
    assert grown - before >= 60 * 2**20
    del block
    memory.start_round()
    assert memory.peak_rss_bytes() < grown - 32 * 2**20  # the old peak is forgotten


def test_process_start_is_in_the_past():
    import time

    age = time.time() - resources.process_start_time()
    assert 0 < age < 24 * 3600


def test_rank_histogram_is_short_for_any_number_of_clients():
    assert console.rank_histogram([8] * 10000) == "8 ×10000"
    assert console.rank_histogram([16, 8, 8, 4, 4, 4, 2, 2]) == "16 ×1, 8 ×2, 4 ×3, 2 ×2"


def test_round_progress_is_quiet_for_short_rounds_and_paced_for_long_ones():
    now = [0.0]
    lines = []
    progress = console.RoundProgress(3, total=10000, hosted=5000, every=10.0, clock=lambda: now[0],
                                     write=lines.append)
    for done in range(1, 5001):
        now[0] = done * 0.01  # 10 ms a client: 50 s for rank 0's share
        progress.update(done)
    assert len(lines) == 4  # at 10, 20, 30 and 40 s; nothing at the end
    assert lines[0] == "round 3: 2000/10000 clients trained (rank 0: 1000/5000), 10s elapsed, about 40s to go"
    short = console.RoundProgress(0, total=8, hosted=4, every=10.0, clock=lambda: 1.0, write=lines.append)
    for done in range(1, 5):
        short.update(done)
    assert len(lines) == 4


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [1, 3])
def test_mpi_traffic_counts_follow_each_collective(ranks):
    result = run_mpi(ranks, [sys.executable, "-m", "mpi4py", str(REPO / "tests/mpi_scripts/traffic_check.py")],
                     env=mpi_env(), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(" ok") == ranks


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [1, 2])
def test_rounds_record_every_ranks_figures(tmp_path, ranks):
    from test_run import run_ok, write_config

    from florist_mpi.analysis import open_run

    config, log = write_config(tmp_path)
    run_ok(ranks, config)
    run = open_run(log)
    with h5py.File(log, "r") as handle:
        assert handle.attrs["num_nodes"] == 1 and len(handle.attrs["hosts"]) == ranks
        assert len(handle.attrs["threads_per_rank"]) == ranks and handle.attrs["time_startup"] > 0
        for r, key in enumerate(sorted(handle["rounds"])):
            group = handle["rounds"][key]
            figures = {name: group["ranks"][name][()] for name in group["ranks"]}
            assert set(figures) == {"time_train", "time_wait", "clients", "peak_rss_bytes", "mpi_bytes_sent",
                                    "mpi_bytes_received"}
            assert all(len(v) == ranks for v in figures.values())
            # 4 clients, round robin over the ranks
            assert figures["clients"].tolist() == [len(range(k, 4, ranks)) for k in range(ranks)]
            assert (figures["peak_rss_bytes"] > 100 * 2**20).all()  # a process with torch loaded
            attrs = group.attrs
            # the phase maxima are the ranks' own maxima; the round took at least its training
            assert attrs["time_train"] == figures["time_train"].max()
            assert attrs["time_wait"] == figures["time_wait"].max()
            # the round's own write is part of it, and the rest of the round at least its training
            assert 0 < attrs["time_log"] < attrs["time_round"]
            assert attrs["time_round"] - attrs["time_log"] >= attrs["time_train"]
            assert ("time_startup" in attrs) == (r == 0)
            if ranks == 1:
                assert figures["mpi_bytes_sent"].tolist() == [0] and figures["time_wait"].tolist() == [0.0]
            else:  # rank 1 sent its clients' factors to rank 0 (and more: metadata, digests)
                kept = group["clients/num_samples"].shape[0]
                assert kept == 4 and figures["mpi_bytes_sent"][1] > 0
                assert figures["mpi_bytes_received"][0] >= figures["mpi_bytes_sent"][1] - 64
    assert list(run.per_rank.index.names) == ["round", "rank"] and len(run.per_rank) == 2 * ranks
    assert run.launch["num_nodes"] == 1
