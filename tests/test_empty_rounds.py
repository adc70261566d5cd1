"""Rounds that aggregate nobody, and the simulated wait for the deadline, in whole runs.

Scenarios from a small demo-like config with a `system` section whose downlink is so slow
that every client misses `system.deadline_s` as soon as it has a global update to download
(round 1 on): round 0 aggregates everyone, later rounds nobody.
"""
from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
from conftest import mpi_env
from test_run import launch, run_ok, write_config

pytestmark = pytest.mark.mpi

DEADLINE = 1.0
SYSTEM = {
    "compute_speed": [1.0, 1.0, 1.0, 1.0],
    "downlink_mbps": 0.01,  # round 1's download of FLoRA's stacked factors takes seconds
    "uplink_mbps": 100.0,
    "latency_s": 0.01,
    "deadline_s": DEADLINE,
    "reference_flops": 1.0e9,
    "server_flops": 1.0e10,
}


def empty_config(tmp_path, name="empty.yaml", **federation):
    fed = {"method": "flora", **federation}
    return write_config(tmp_path, name, run={"rounds": 3, "seed": 3}, system=dict(SYSTEM), federation=fed)


def rounds_of(log):
    with h5py.File(log, "r") as handle:
        out = []
        for key in sorted(handle["rounds"]):
            group = handle["rounds"][key]
            out.append({
                "attrs": dict(group.attrs),
                "clients": {k: group["clients"][k][()] for k in group["clients"]},
                "ranks": {m: int(group["global"][m].attrs["rank"]) for m in group["global"]},
                "B_shapes": {m: group["global"][m]["B"].shape for m in group["global"]},
                "adapters": "client_adapters" in group,
            })
        return out


@pytest.fixture(scope="module")
def skipped(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("empty")
    config, log = empty_config(tmp)
    result = run_ok(2, config)
    return tmp, config, log, result


def test_a_round_without_on_time_clients_is_logged_and_the_run_goes_on(skipped):
    _, _, log, result = skipped
    rounds = rounds_of(log)
    assert len(rounds) == 3
    first = rounds[0]
    assert first["attrs"]["clients_aggregated"] == 4 and len(first["clients"]["excluded"]) == 0
    for r in (1, 2):
        rnd, attrs = rounds[r], rounds[r]["attrs"]
        assert attrs["clients_aggregated"] == 0
        assert sorted(rnd["clients"]["excluded"].tolist()) == rnd["clients"]["id"].tolist() == [0, 1, 2, 3]
        reasons = [x.decode() for x in rnd["clients"]["excluded_reason"]]
        assert all(why.startswith("straggler: simulated") and "system.deadline_s 1" in why for why in reasons)
        assert set(rnd["ranks"].values()) == {0} and all(shape[1] == 0 for shape in rnd["B_shapes"].values())
        assert not rnd["adapters"]
        assert attrs["bytes_up"] == 0 and attrs["bytes_down"] == 0
        # no global update: the global model, and so its eval loss, is round 0's
        assert attrs["eval_loss"] == first["attrs"]["eval_loss"]
        # the server waited until the deadline and aggregated nothing
        assert attrs["sim_server_s"] == 0.0 and attrs["sim_time_s"] == DEADLINE
        assert math.isnan(float(np.mean(rnd["clients"]["train_loss"])))
    # what clients download is still round 0's global update
    assert np.array_equal(rounds[1]["clients"]["bytes_down"], rounds[2]["clients"]["bytes_down"])
    assert rounds[1]["clients"]["bytes_down"].min() > 0
    clock = np.cumsum([r["attrs"]["sim_time_s"] for r in rounds])
    assert [r["attrs"]["sim_clock_s"] for r in rounds] == pytest.approx(clock.tolist(), rel=1e-12)
    assert result.stdout.count("no client could be aggregated") == 2
    assert "federation.empty_round: skip" in result.stdout
    assert "Traceback" not in result.stderr


def test_resume_passes_an_empty_round(skipped, tmp_path):
    tmp, _, log, _ = skipped
    config, _ = write_config(tmp, "empty.yaml", run={"rounds": 4, "seed": 3}, system=dict(SYSTEM),
                             federation={"method": "flora"})
    run_ok(2, config, "--resume")
    rounds = rounds_of(log)
    assert len(rounds) == 4 and rounds[3]["attrs"]["clients_aggregated"] == 0
    assert rounds[3]["attrs"]["eval_loss"] == rounds[0]["attrs"]["eval_loss"]  # the replayed global model


@pytest.mark.parametrize("ranks", [1, 2])
def test_empty_round_fail_ends_the_run_with_one_line(tmp_path, ranks):
    config, log = empty_config(tmp_path, empty_round="fail")
    result = launch(ranks, config, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "florist-mpi: error" in line]
    assert len(errors) == 1 and "round 1 has no client left to aggregate" in errors[0], result.stderr[-3000:]
    assert "clients 0, 1, 2, 3: straggler" in errors[0]
    assert "Traceback" not in result.stderr
    assert [r["attrs"]["clients_aggregated"] for r in rounds_of(log)] == [4]


def test_all_clients_rejected_skip_keeps_the_global_model_and_resume_replays_it(tmp_path):
    """FlexLoRA keeps its global update beside the base: a round whose every client sent NaN leaves it
    as it was, for the clients of the next round too; a resume after it replays exactly that."""
    env = mpi_env()
    env["FLORIST_MPI_FAULT"] = ",".join(f"nan@1:{c}" for c in range(4))
    config, log = write_config(tmp_path, "flex.yaml", run={"rounds": 3}, federation={"method": "flexlora"})
    run_ok(2, config, env=env)
    rounds = rounds_of(log)
    assert [r["attrs"]["clients_aggregated"] for r in rounds] == [4, 0, 4]
    assert rounds[1]["attrs"]["eval_loss"] == rounds[0]["attrs"]["eval_loss"]
    reasons = {x.decode() for x in rounds[1]["clients"]["excluded_reason"]}
    assert reasons == {"non-finite factors (NaN/Inf)"}

    flex = {"method": "flexlora"}
    killed_config, killed_log = write_config(tmp_path, "flex2.yaml", run={"rounds": 2}, federation=flex)
    run_ok(2, killed_config, env=env)
    resumed_config, _ = write_config(tmp_path, "flex2.yaml", run={"rounds": 3}, federation=flex)
    run_ok(2, resumed_config, "--resume")
    with h5py.File(log, "r") as a, h5py.File(killed_log, "r") as b:
        for module in a["rounds/00002/global"]:
            for x in ("B", "A"):
                assert np.array_equal(a[f"rounds/00002/global/{module}/{x}"][()],
                                      b[f"rounds/00002/global/{module}/{x}"][()]), module
        assert a["rounds/00002"].attrs["eval_loss"] == b["rounds/00002"].attrs["eval_loss"]


def test_a_deadline_straggler_makes_the_round_last_until_the_deadline(tmp_path):
    """One slow client misses the deadline in every round: the server waits the deadline out."""
    system = dict(SYSTEM, compute_speed=[1.0, 1.0, 1.0, 1e-4], downlink_mbps=100.0)
    config, log = write_config(tmp_path, "late.yaml", system=system, federation={"method": "florist"})
    run_ok(2, config)
    for rnd in rounds_of(log):
        attrs, clients = rnd["attrs"], rnd["clients"]
        assert clients["excluded"].tolist() == [3]
        arrivals = clients["sim_download_s"] + clients["sim_compute_s"] + clients["sim_upload_s"]
        assert arrivals[:3].max() < DEADLINE < arrivals[3]
        assert attrs["sim_time_s"] == pytest.approx(attrs["sim_server_s"] + DEADLINE, rel=1e-12)


def test_a_rejected_client_counts_in_the_wait(tmp_path):
    """No deadline: the round lasts until the last upload arrived, a NaN client's included."""
    env = mpi_env()
    env["FLORIST_MPI_FAULT"] = "nan@0:3"
    system = dict(SYSTEM, compute_speed=[1.0, 1.0, 1.0, 0.25], downlink_mbps=100.0, deadline_s=None)
    config, log = write_config(tmp_path, "nan.yaml", run={"rounds": 1}, system=system,
                               federation={"method": "florist"})
    run_ok(1, config, env=env)
    (rnd,) = rounds_of(log)
    clients = rnd["clients"]
    assert clients["excluded"].tolist() == [3]
    arrivals = clients["sim_download_s"] + clients["sim_compute_s"] + clients["sim_upload_s"]
    assert arrivals[3] > arrivals[:3].max()  # the rejected client is the last to arrive
    assert rnd["attrs"]["sim_time_s"] == pytest.approx(rnd["attrs"]["sim_server_s"] + arrivals[3], rel=1e-12)


def test_a_run_whose_every_round_was_empty_resumes_like_the_uninterrupted_run(tmp_path):
    """Nothing was ever aggregated (no global update to replay): resume goes on, and the simulated
    figures equal those of the same rounds run in one go."""
    system = dict(SYSTEM, deadline_s=1e-6)  # nobody can arrive in time, round 0 included
    config, log = write_config(tmp_path, "never.yaml", run={"rounds": 1, "seed": 3}, system=system,
                               federation={"method": "florist"})
    run_ok(1, config)
    config, _ = write_config(tmp_path, "never.yaml", run={"rounds": 2, "seed": 3}, system=system,
                             federation={"method": "florist"})
    run_ok(1, config, "--resume")
    whole, whole_log = write_config(tmp_path, "whole.yaml", run={"rounds": 2, "seed": 3}, system=system,
                                    federation={"method": "florist"})
    run_ok(1, whole)
    resumed, straight = rounds_of(log), rounds_of(whole_log)
    assert [r["attrs"]["clients_aggregated"] for r in resumed] == [0, 0]
    for a, b in zip(resumed, straight):
        for key in ("sim_time_s", "sim_clock_s", "eval_loss", "bytes_down"):
            assert a["attrs"][key] == b["attrs"][key], key
        assert (a["clients"]["sim_download_s"] == b["clients"]["sim_download_s"]).all()
