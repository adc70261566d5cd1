"""The simulated deployment clock: profiles, the pure model, and every logged figure recomputed
independently from the log's bytes, shapes and the profile."""
from __future__ import annotations

import csv
import hashlib
import math

import h5py
import numpy as np
import pytest
import torch
import yaml

from florist_mpi import simclock
from florist_mpi.cli import main as cli_main
from florist_mpi.config import config_from_tree
from florist_mpi.data import DataError, system_tables

SEED = 3


def stream_rng(seed, client, stream):
    """The documented per-client stream: SeedSequence([seed, round slot 0 + 1, client + 1, stream])."""
    return np.random.default_rng(
        np.random.SeedSequence([seed, 1, client + 1, stream]).generate_state(1, dtype=np.uint32)[0]
    )


def florist_flops(m, n, R, r_g):
    """docs/simulated-clock.md: FLoRIST's cheaper exact route for one m×n module, final products included."""
    small, large = min(m, n), max(m, n)

    def strips(width):  # the Gram's upper triangle in strips of ≥ 64 columns, at most 4
        return max(1, min(4, width // 64))

    gram = (m + n) * R**2 * (1 + 1 / strips(R)) + 18 * R**3
    dense = 2 * m * n * R + large * small**2 * (1 + 1 / strips(small)) + 13 * small**3
    if gram < dense and R < 0.8 * small:
        return gram + 2 * (m + n) * R * r_g
    return dense + 2 * m * n * r_g


def test_profiles_resolve_per_client_from_seed_and_client():
    cfg = config_from_tree(
        {
            "run": {"seed": SEED},
            "federation": {"num_clients": 5},
            "system": {
                "compute_speed": {"distribution": "lognormal", "median": 2.0, "sigma": 0.7},
                "downlink_mbps": {"distribution": "uniform", "low": 50, "high": 150},
                "uplink_mbps": [1, 2, 3, 4, 5],
                "latency_s": 0.25,
            },
        }
    )
    profile = simclock.resolve_profile(cfg.system, 5, SEED)
    speeds = [2.0 * math.exp(0.7 * stream_rng(SEED, c, 6).standard_normal()) for c in range(5)]
    downs = [50 + 100 * stream_rng(SEED, c, 7).random() for c in range(5)]
    assert np.allclose(profile.compute_speed, speeds, rtol=1e-12)
    assert np.allclose(profile.downlink_mbps, downs, rtol=1e-12)
    assert profile.uplink_mbps.tolist() == [1, 2, 3, 4, 5] and profile.latency_s.tolist() == [0.25] * 5
    assert len(set(profile.compute_speed.tolist())) == 5  # one draw per client
    # a client's value does not depend on how many clients there are
    more = config_from_tree(
        {
            "run": {"seed": SEED},
            "federation": {"num_clients": 7},
            "system": {"compute_speed": {"distribution": "lognormal", "median": 2.0, "sigma": 0.7}},
        }
    )
    assert np.array_equal(simclock.resolve_profile(more.system, 7, SEED).compute_speed[:5], profile.compute_speed)


def test_transfer_compute_and_round_time():
    assert simclock.transfer_seconds(0, 1.0, 5.0) == 0.0
    assert simclock.transfer_seconds(1_000_000, 8.0, 0.5) == pytest.approx(0.5 + 1.0)
    shapes = {"a": (6, 4), "b": (3, 5)}
    assert simclock.upload_bytes("fedit", shapes, 2) == 4 * 2 * (10 + 8)
    assert simclock.upload_bytes("ffa", shapes, 2) == 4 * 2 * (6 + 3)
    assert simclock.download_bytes("flexlora", shapes, {"a": 5, "b": 1}, 2) == 4 * (2 * 10 + 1 * 8)
    assert simclock.download_bytes("florist", shapes, {"a": 5, "b": 1}, 2) == 4 * (5 * 10 + 1 * 8)
    assert simclock.download_bytes("florist", shapes, None, 2) == 0
    assert simclock.adapter_params("ffa", shapes, 2) == (36, 18)
    assert simclock.training_flops_per_token(100, 36, 18) == 4 * 136 + 36
    profile = simclock.ClientProfile(np.array([2.0]), np.array([8.0]), np.array([4.0]), np.array([0.1]))
    work = simclock.ClientWork(0, tokens=10, flops=4e9, bytes_down=2_000_000, bytes_up=1_000_000)
    t = simclock.client_times(work, profile, reference_flops=1e9)
    assert (t.download_s, t.compute_s, t.upload_s) == pytest.approx((0.1 + 2.0, 2.0, 0.1 + 2.0))
    assert simclock.round_seconds(0.5, [t, simclock.ClientTimes(1, 1, 1)]) == pytest.approx(0.5 + 6.2)


def test_round_waits_for_the_deadline_when_a_client_never_arrives():
    T = simclock.ClientTimes
    arrived = [T(0, 4, 0), T(0, 7, 0)]  # a third client would have taken 12 s: a straggler
    assert simclock.round_seconds(0.5, arrived, complete=False, deadline_s=10.0) == 0.5 + 10.0
    assert simclock.round_seconds(0.5, arrived, complete=True, deadline_s=10.0) == 0.5 + 7.0
    assert simclock.round_seconds(0.5, arrived, complete=False, deadline_s=None) == 0.5 + 7.0
    assert simclock.round_seconds(0.0, [], complete=False, deadline_s=10.0) == 10.0  # nobody arrived


def test_clock_closes_rounds_by_hand_computed_times():
    """4 s, 7 s and 12 s clients, deadline 10 s: the round lasts server + 10 s; over-committed, it closes
    at the target-th arrival; a round that aggregates nobody costs no server time."""
    T = simclock.ClientTimes
    cfg = config_from_tree({"federation": {"num_clients": 3}, "system": {"deadline_s": 10.0, "server_flops": 1e10}})
    clock = simclock.Clock(cfg, {"m": (8, 8)}, base_params=100)
    times = {0: T(1, 2, 1), 1: T(1, 5, 1), 2: T(1, 10, 1)}
    plan = simclock.schedule(times, target=3, deadline_s=10.0)
    clock.round = simclock.RoundPlan(work={}, times=times, schedule=plan)
    assert plan.train == [0, 1] and [c for c, _ in plan.stragglers] == [2]
    attrs = clock.close_round([0, 1], {"m": 2})
    server = attrs["sim_server_s"]
    assert server > 0 and attrs["sim_time_s"] == pytest.approx(server + 10.0, rel=1e-12)
    empty = clock.close_round([], {})  # e.g. both on-time clients sent NaN: rejected after arriving at 7 s
    assert empty["sim_server_s"] == 0.0 and empty["sim_time_s"] == 10.0  # the straggler was still awaited
    assert empty["sim_clock_s"] == pytest.approx(server + 20.0, rel=1e-12)

    overcommitted = simclock.schedule(times, target=2, deadline_s=10.0)
    clock.target, clock.round = 2, simclock.RoundPlan(work={}, times=times, schedule=overcommitted)
    assert clock.close_round([], {})["sim_time_s"] == 7.0  # the 2nd arrival closes the round


def test_deadline_messages_tell_the_times_apart():
    T = simclock.ClientTimes
    plan = simclock.schedule({0: T(0, 0.145, 0), 1: T(0, 0.1400004, 0)}, target=2, deadline_s=0.14)
    reasons = dict(plan.stragglers)
    assert "simulated 0.145s exceeds system.deadline_s 0.14s" in reasons[0]
    assert "simulated 0.1400004s exceeds system.deadline_s 0.14s" in reasons[1]


def test_schedule_deadline_and_overcommit():
    T = simclock.ClientTimes
    times = {4: T(1, 1, 1), 1: T(0, 9, 0), 2: T(0, 2, 0), 7: T(0, 3, 0), 3: T(0, 2, 0)}
    plan = simclock.schedule(times, target=2, deadline_s=5.0)
    assert plan.train == [2, 3]  # 2 and 3 finish at 2 s (tie by id), 4 and 7 at 3 s
    reasons = dict(plan.stragglers)
    assert sorted(reasons) == [1, 4, 7]
    assert "system.deadline_s" in reasons[1] and "overcommit" in reasons[4] and "overcommit" in reasons[7]
    assert simclock.schedule(times, target=10, deadline_s=None).train == [1, 2, 3, 4, 7]


def test_csv_profiles(tmp_path):
    path = tmp_path / "links.csv"
    path.write_text("client,downlink_mbps,up\n0,100,5\n1,250.5,7\n2,80,1\n")
    cfg = config_from_tree(
        {
            "federation": {"num_clients": 3},
            "system": {"downlink_mbps": {"csv": str(path)}, "uplink_mbps": {"csv": str(path), "column": "up"}},
        }
    )
    tables = system_tables(cfg.system, 3)
    assert tables["downlink_mbps"].tolist() == [100, 250.5, 80] and tables["uplink_mbps"].tolist() == [5, 7, 1]
    assert simclock.resolve_profile(cfg.system, 3, 0, tables).uplink_mbps.tolist() == [5, 7, 1]
    for body, needle in [
        ("downlink_mbps,up\n1,1\n2,2\n", "has 2 rows but federation.num_clients is 3"),
        ("downlink_mbps,up\n1,1\n0,2\n3,3\n", "must be positive"),
        ("downlink_mbps,up\n1,1\nfast,2\n3,3\n", "is not a number"),
        ("bandwidth,up\n1,1\n2,2\n3,3\n", "no column 'downlink_mbps'"),
    ]:
        path.write_text(body)
        with pytest.raises(DataError, match=needle):
            system_tables(cfg.system, 3)
    path.unlink()
    with pytest.raises(DataError, match="not found"):
        system_tables(cfg.system, 3)


def test_logs_without_system_keep_the_config_text():
    cfg = config_from_tree({})
    text = cfg.to_yaml()
    assert "system" not in text and "overcommit" not in text
    assert config_from_tree({"federation": {"overcommit": None}, "system": None}).to_yaml() == text


# ------------------------------------------------------------------- end to end

pytest_mpi = pytest.mark.mpi

LINK_CSV = "client,downlink_mbps\n0,2\n1,4\n2,1.5\n3,3\n"
SYSTEM = {
    "compute_speed": {"distribution": "lognormal", "median": 1.0, "sigma": 0.5},
    "uplink_mbps": [0.5, 1.0, 2.0, 0.25],
    "latency_s": {"distribution": "uniform", "low": 0.01, "high": 0.2},
    "reference_flops": 1.0e9,
    "server_flops": 1.0e10,
}


def clock_config(tmp_path, name, **sections):
    from test_run import write_config

    csv_path = tmp_path / "links.csv"
    csv_path.write_text(LINK_CSV)
    system = dict(SYSTEM, downlink_mbps={"csv": str(csv_path)})
    federation = {"num_clients": 4, "clients_per_round": 2, "overcommit": 0.5, "method": "florist", "tau": 0.8}
    federation.update(sections.pop("federation", {}))
    return write_config(tmp_path, name, system=system, federation=federation, **sections)


@pytest.fixture(scope="module")
def clock_runs(tmp_path_factory):
    """The same clock config on 1 and 2 ranks, a 1-round run resumed to 2 rounds, and FedIT."""
    from test_run import run_ok

    tmp = tmp_path_factory.mktemp("clock")
    logs = {}
    for ranks in (1, 2):
        config, logs[ranks] = clock_config(tmp, f"r{ranks}.yaml")
        run_ok(ranks, config)
    config, logs["resumed"] = clock_config(tmp, "resumed.yaml", run={"rounds": 1, "seed": 3})
    run_ok(1, config)
    config, _ = clock_config(tmp, "resumed.yaml")
    run_ok(2, config, "--resume")
    config, logs["fedit"] = clock_config(tmp, "fedit.yaml", federation={"method": "fedit"})
    run_ok(1, config)
    return tmp, logs


def read_rounds(log):
    out = []
    with h5py.File(log, "r") as handle:
        cfg = yaml.safe_load(handle.attrs["config"])
        shapes = {
            m.decode() if isinstance(m, bytes) else m: tuple(int(x) for x in s)
            for m, s in zip(handle.attrs["modules"], handle.attrs["module_shapes"])
        }
        for key in sorted(handle["rounds"]):
            group = handle["rounds"][key]
            out.append(
                {
                    "attrs": dict(group.attrs),
                    "clients": {k: group["clients"][k][()] for k in group["clients"]},
                    "global_ranks": {m: int(group["global"][m].attrs["rank"]) for m in group["global"]},
                }
            )
    return cfg, shapes, out


def expected_tokens(cfg_tree, client, round_index):
    """Padded tokens of the client's micro-batches, recomputed from the data and the tokenizer."""
    from transformers import AutoTokenizer

    from florist_mpi import data as data_lib
    from florist_mpi.model import ensure_tiny_artifacts

    cfg = config_from_tree(cfg_tree)
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_tiny_artifacts(cfg)))
    records = data_lib.client_records(cfg.data, cfg.federation.num_clients, cfg.run.seed)[client]
    encoded = data_lib.encode_records(records, tokenizer, cfg.data.max_length)
    seed = int(
        np.random.SeedSequence([cfg.run.seed, round_index + 1, client + 1, 2]).generate_state(1, dtype=np.uint32)[0]
    )
    batches = data_lib.sample_batches(
        encoded, cfg.train.micro_batch_size, cfg.train.local_steps, torch.Generator().manual_seed(seed)
    )
    return sum(len(b) * max(len(encoded[i][0]) for i in b) for b in batches)


def linear_weights(tiny) -> int:
    h, i, v, layers = tiny["hidden_size"], tiny["intermediate_size"], tiny["vocab_size"], tiny["num_hidden_layers"]
    return layers * (4 * h * h + 3 * h * i) + h * v  # q k v o, gate up down, lm_head


@pytest_mpi
def test_every_simulated_figure_recomputed_from_the_log(clock_runs):
    tmp, logs = clock_runs
    cfg, shapes, rounds = read_rounds(logs[1])
    seed, ranks_of = cfg["run"]["seed"], cfg["lora"]["ranks"]
    speeds = [math.exp(0.5 * stream_rng(seed, c, 6).standard_normal()) for c in range(4)]
    latency = [0.01 + 0.19 * stream_rng(seed, c, 9).random() for c in range(4)]
    down_mbps = [float(row["downlink_mbps"]) for row in csv.DictReader(open(tmp / "links.csv"))]
    up_mbps = SYSTEM["uplink_mbps"]
    base = linear_weights(cfg["model"]["tiny"])
    clock = 0.0
    previous_ranks = None
    for r, rnd in enumerate(rounds):
        a, c = rnd["attrs"], rnd["clients"]
        ids = c["id"].tolist()
        assert len(ids) == 3  # 2 per round, over-committed by 50 %
        reasons = dict(zip(c["excluded"].tolist(), [x.decode() for x in c["excluded_reason"]]))
        totals = {}
        for j, k in enumerate(ids):
            rank = ranks_of[k]
            up = 4 * sum(rank * (m + n) for m, n in shapes.values())
            down = (
                0
                if previous_ranks is None
                else 4 * sum(previous_ranks[mod] * (m + n) for mod, (m, n) in shapes.items())
            )
            assert c["bytes_up"][j] == up and c["bytes_down"][j] == down
            want_down = 0.0 if down == 0 else latency[k] + down * 8 / (down_mbps[k] * 1e6)
            want_up = latency[k] + up * 8 / (up_mbps[k] * 1e6)
            adapter = sum(rank * (m + n) for m, n in shapes.values())
            tokens = expected_tokens(cfg, k, r)
            assert c["sim_tokens"][j] == tokens
            want_compute = tokens * (4 * (base + adapter) + 2 * adapter) / (SYSTEM["reference_flops"] * speeds[k])
            assert c["sim_download_s"][j] == pytest.approx(want_down, rel=1e-12)
            assert c["sim_upload_s"][j] == pytest.approx(want_up, rel=1e-12)
            assert c["sim_compute_s"][j] == pytest.approx(want_compute, rel=1e-12)
            totals[k] = want_down + want_up + want_compute
        # the first two to finish are aggregated, the third is a straggler with its reason
        order = sorted(totals, key=lambda k: (totals[k], k))
        assert sorted(reasons) == [order[2]] and "overcommit" in reasons[order[2]]
        assert math.isnan(c["train_loss"][ids.index(order[2])])
        kept = order[:2]
        R = sum(ranks_of[k] for k in kept)
        flops = sum(florist_flops(m, n, R, rnd["global_ranks"][mod]) for mod, (m, n) in shapes.items())
        assert a["sim_server_s"] == pytest.approx(flops / SYSTEM["server_flops"], rel=1e-12)
        assert a["sim_time_s"] == pytest.approx(a["sim_server_s"] + max(totals[k] for k in kept), rel=1e-12)
        clock += a["sim_time_s"]
        assert a["sim_clock_s"] == pytest.approx(clock, rel=1e-12)
        assert a["bytes_up"] == sum(c["bytes_up"][ids.index(k)] for k in kept)
        previous_ranks = rnd["global_ranks"]


@pytest_mpi
def test_simulated_figures_do_not_depend_on_ranks_or_resume(clock_runs):
    _, logs = clock_runs
    _, _, one = read_rounds(logs[1])
    for other in (logs[2], logs["resumed"]):
        _, _, rounds = read_rounds(other)
        assert len(rounds) == len(one) == 2
        for a, b in zip(one, rounds):
            for key in (
                "id",
                "bytes_down",
                "bytes_up",
                "sim_tokens",
                "sim_download_s",
                "sim_compute_s",
                "sim_upload_s",
                "excluded",
            ):
                assert np.array_equal(a["clients"][key], b["clients"][key]), key
            for key in ("sim_server_s", "sim_time_s", "sim_clock_s"):
                assert a["attrs"][key] == b["attrs"][key], key


@pytest_mpi
def test_florist_downloads_faster_than_fedit_and_reaches_the_target_sooner(clock_runs, capsys):
    _, logs = clock_runs
    _, _, florist = read_rounds(logs[1])
    _, _, fedit = read_rounds(logs["fedit"])
    # round 1 downloads round 0's global factors: FLoRIST's τ = 0.8 rank is below FedIT's
    assert np.mean(florist[1]["clients"]["sim_download_s"]) < np.mean(fedit[1]["clients"]["sim_download_s"])
    assert florist[1]["attrs"]["sim_clock_s"] < fedit[1]["attrs"]["sim_clock_s"]
    target = max(min(r["attrs"]["eval_loss"] for r in run) for run in (florist, fedit))
    code = cli_main(["report", str(logs[1]), str(logs["fedit"])])
    out = capsys.readouterr().out
    assert code == 0 and "Time to reach eval loss" in out, out
    table = out.split("Time to reach eval loss")[1]
    assert f"{target:.4f}" in table.splitlines()[0]
    for name, run in (("r1", florist), ("fedit", fedit)):
        first = next(r for r in run if r["attrs"]["eval_loss"] <= target)
        row = next(line for line in table.splitlines() if line.startswith(name + " "))
        assert f"{first['attrs']['sim_clock_s']:.2f}" in row, row


def snapshot(root):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("body", ["client,downlink_mbps\n0,1\n1,2\n", None])
def test_bad_csv_profile_is_one_line_exit_2(tmp_path, capsys, body):
    config, log = clock_config(tmp_path, "bad.yaml")
    if body is None:
        (tmp_path / "links.csv").unlink()
    else:
        (tmp_path / "links.csv").write_text(body)
    before = snapshot(tmp_path)
    code = cli_main(["run", str(config)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("florist-mpi: error:") and "\n" not in err, err
    assert "system.downlink_mbps" in err and ("has 2 rows" in err if body else "not found" in err), err
    assert snapshot(tmp_path) == before


@pytest_mpi
def test_sweep_tau_adds_the_simulated_round_time(clock_runs, capsys):
    import pandas as pd

    tmp, logs = clock_runs
    out = tmp / "sweep"
    assert cli_main(["sweep-tau", str(logs[1]), "--round", "1", "--taus", "0.5,1", "--out", str(out)]) == 0
    assert "sim round s" in capsys.readouterr().out
    table = pd.read_csv(out / "sweep.csv")
    cfg, shapes, rounds = read_rounds(logs[1])
    c = rounds[1]["clients"]
    kept = [k for k in c["id"].tolist() if k not in set(c["excluded"].tolist())]
    seed, ranks_of = cfg["run"]["seed"], cfg["lora"]["ranks"]
    latency = [0.01 + 0.19 * stream_rng(seed, k, 9).random() for k in range(4)]
    down_mbps = [float(row["downlink_mbps"]) for row in csv.DictReader(open(tmp / "links.csv"))]
    for _, row in table.iterrows():
        r_g = {m: int(row[f"rank:{m}"]) for m in shapes}
        R = sum(ranks_of[k] for k in kept)
        server = sum(florist_flops(m, n, R, r_g[mod]) for mod, (m, n) in shapes.items())
        slowest = 0.0
        for k in kept:
            j = c["id"].tolist().index(k)
            down = 4 * sum(r_g[mod] * (m + n) for mod, (m, n) in shapes.items())
            slowest = max(
                slowest, latency[k] + down * 8 / (down_mbps[k] * 1e6) + c["sim_compute_s"][j] + c["sim_upload_s"][j]
            )
        assert row["sim_round_s"] == pytest.approx(server / SYSTEM["server_flops"] + slowest, rel=1e-9)
