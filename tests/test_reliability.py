"""Reliability: crash-safe log, exact resume, faulty clients, failing ranks, bad input."""
from __future__ import annotations

import hashlib
import json
import re
import time

import h5py
import numpy as np
import pytest
import yaml
from conftest import mpi_env
from test_run import launch, run_ok, write_config

from florist_mpi import storage
from florist_mpi.cli import main as cli_main

pytestmark = pytest.mark.mpi


def global_factors(log):
    with h5py.File(log, "r") as handle:
        return {
            (r, m, x): handle["rounds"][r]["global"][m][x][()]
            for r in handle["rounds"] for m in handle["rounds"][r]["global"] for x in "BA"
        }


def rounds_in(log):
    with h5py.File(log, "r") as handle:
        return sorted(handle["rounds"].keys())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    config, log = write_config(tmp, "full.yaml", run={"rounds": 3})
    run_ok(2, config)
    return log


@pytest.mark.parametrize("point", ["train@1", "gather@2", "aggregate@1", "write@1", "write@0", "link@1", "link@0"])
def test_kill_then_resume_is_bitwise_identical(tmp_path, uninterrupted, point):
    config, log = write_config(tmp_path, run={"rounds": 3})
    env = mpi_env()
    env["FLORIST_MPI_KILL_AT"] = point
    killed = launch(2, config, env=env, timeout=300)
    assert killed.returncode != 0
    killed_round = int(point.split("@")[1])
    if killed_round == 0:  # nothing completed: no log at all, and a fresh start works
        assert not (tmp_path / "cfg.h5").exists()
        run_ok(2, config)
    else:
        assert rounds_in(log) == [f"{r:05d}" for r in range(killed_round)]  # opens; no partial round
        run_ok(2, config, "--resume")
    assert rounds_in(log) == ["00000", "00001", "00002"]
    full, resumed = global_factors(uninterrupted), global_factors(log)
    assert full.keys() == resumed.keys()
    for key in full:
        assert np.array_equal(full[key], resumed[key]), key


def test_a_single_file_log_resumes_in_its_own_form(tmp_path, uninterrupted):
    """A packed (or format-1) log is continued by copy-append: no round folder, same numbers."""
    config, log = write_config(tmp_path, run={"rounds": 3})
    env = mpi_env()
    env["FLORIST_MPI_KILL_AT"] = "train@2"
    assert launch(2, config, env=env, timeout=300).returncode != 0
    single = tmp_path / "single.h5"
    storage.pack_log(log, single)
    run_ok(2, config, "--resume", "--set", f"run.output={single}")
    assert rounds_in(single) == ["00000", "00001", "00002"]
    assert not storage.rounds_folder(single).exists()
    full, resumed = global_factors(uninterrupted), global_factors(single)
    assert full.keys() == resumed.keys()
    for key in full:
        assert np.array_equal(full[key], resumed[key]), key


def test_resume_may_switch_client_engines_and_stays_bitwise(tmp_path, uninterrupted):
    """Reused and fresh client engines give bitwise-equal clients, so switching them never blocks --resume."""
    config, log = write_config(tmp_path, run={"rounds": 3})
    env = mpi_env()
    env["FLORIST_MPI_KILL_AT"] = "train@2"
    assert launch(2, config, env=env, timeout=300).returncode != 0
    run_ok(2, config, "--resume", "--set", "train.client_engines=fresh")
    full, resumed = global_factors(uninterrupted), global_factors(log)
    assert full.keys() == resumed.keys()
    for key in full:
        assert np.array_equal(full[key], resumed[key]), key


def test_resume_on_another_rank_count_matches(tmp_path, uninterrupted):
    config, log = write_config(tmp_path, run={"rounds": 3})
    env = mpi_env()
    env["FLORIST_MPI_KILL_AT"] = "train@2"
    assert launch(2, config, env=env, timeout=300).returncode != 0
    run_ok(3, config, "--resume")
    with h5py.File(log, "r") as handle:  # each round says how many ranks ran it; the root, the creating run
        assert [handle["rounds"][r].attrs["world_size"] for r in sorted(handle["rounds"])] == [2, 2, 3]
        assert handle.attrs["world_size"] == 2
    full, resumed = global_factors(uninterrupted), global_factors(log)
    for (r, m, x) in full:
        if x == "B":
            a = full[(r, m, "B")].astype(np.float64) @ full[(r, m, "A")]
            b = resumed[(r, m, "B")].astype(np.float64) @ resumed[(r, m, "A")]
            assert np.allclose(a, b, rtol=1e-4, atol=1e-6), (r, m)


def test_faulty_and_dropped_clients_are_excluded_and_recorded(tmp_path):
    from florist_mpi.clients import dropped_out
    from florist_mpi.config import load_config

    config, log = write_config(tmp_path, federation={"dropout": 0.3})
    cfg = load_config(config)
    env = mpi_env()
    env["FLORIST_MPI_FAULT"] = "nan@0:2,raise@1:0"
    result = run_ok(2, config, env=env)
    faults = {0: (2, "non-finite"), 1: (0, "training failed")}
    with h5py.File(log, "r") as handle:
        for round_index, (faulty, expected_reason) in faults.items():
            group = handle["rounds"][f"{round_index:05d}"]
            excluded = group["clients/excluded"][()].tolist()
            reasons = dict(
                zip(excluded, (r.decode() if isinstance(r, bytes) else r for r in group["clients/excluded_reason"][()]))
            )
            dropped = {c for c in range(4) if dropped_out(cfg, round_index, c)}
            for client in dropped:
                assert "dropout" in reasons[client]
            if faulty not in dropped:
                assert expected_reason in reasons[faulty]
            assert set(excluded) == dropped | {faulty}
            assert set(group["client_adapters"].keys()) == {str(c) for c in range(4)} - {str(c) for c in excluded}
    assert any(dropped_out(cfg, r, c) for r in range(2) for c in range(4)), "pick a seed where someone drops out"
    if 0 not in {c for c in range(4) if dropped_out(cfg, 1, c)}:
        assert "client 0 failed in round 1" in result.stderr


def test_round_with_no_client_left_fails_clearly(tmp_path):
    config, log = write_config(tmp_path, federation={"empty_round": "fail"})
    env = mpi_env()
    env["FLORIST_MPI_FAULT"] = ",".join(f"nan@0:{c}" for c in range(4))
    result = launch(2, config, env=env, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("round 0 has no client left to aggregate") == 1
    assert not (tmp_path / "cfg.h5").exists()


@pytest.mark.parametrize("fault", ["crash@0:1", "exit@0:1"])
def test_failing_rank_ends_the_job_promptly(tmp_path, fault):
    config, _ = write_config(tmp_path)
    env = mpi_env()
    env["FLORIST_MPI_FAULT"] = fault
    result = launch(3, config, env=env, timeout=120)
    ended = time.time()
    assert result.returncode != 0
    injected = [float(line.rsplit(" ", 1)[1]) for line in result.stderr.splitlines() if line.startswith("[fault]")]
    assert len(injected) == 1, result.stderr
    assert ended - injected[0] < 30, f"the job took {ended - injected[0]:.1f} s to end after the failure"
    if fault.startswith("crash"):
        assert result.stderr.count("florist-mpi: error") == 1 and "injected fatal error" in result.stderr
    else:  # the killed rank cannot speak; the launcher names it (Open MPI: "[<job>@1,1]", rank 1)
        assert re.search(r"rank 1\b|@\d+,1\]", result.stderr), result.stderr[-2000:]


def test_diverged_ranks_are_detected(tmp_path):
    config, _ = write_config(tmp_path)
    env = mpi_env()
    env["FLORIST_MPI_DIVERGE"] = "0:1"
    result = launch(3, config, env=env, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("base weights differ between rank 0 and ranks [1] after round 0") == 1
    assert not (tmp_path / "cfg.h5").exists()  # the round that diverged is not logged


# ------------------------------------------------------------------------- bad input


def snapshot(paths):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


def bad_data_dir(tmp_path, kind):
    root = tmp_path / "data"
    root.mkdir()
    good = [{"instruction": f"say {i}", "context": "", "response": f"{i}", "category": "c"} for i in range(5)]
    for client in range(4):
        (root / f"local_training_{client}.json").write_text(json.dumps(good))
    (root / "global_test.json").write_text(json.dumps(good))
    broken = root / "local_training_1.json"
    if kind == "empty":
        broken.write_text("")
    elif kind == "malformed":
        broken.write_text('[{"instruction": "x", ')
    elif kind == "missing_field":
        broken.write_text(json.dumps([{"instruction": "x", "context": ""}]))
    elif kind == "no_examples":
        broken.write_text("[]")
    elif kind == "missing_file":
        broken.unlink()
    return root


@pytest.fixture
def existing_log(tmp_path):
    log = tmp_path / "old.h5"
    with h5py.File(log, "w") as handle:
        handle.attrs["note"] = "precious"
    return log


BAD_INPUTS = {
    "yaml syntax": ({"__text__": "run:\n  rounds: [1,\n"}, [], "not valid YAML"),
    "unknown key": ({"run": {"roundz": 2}}, [], "unknown config key 'run.roundz'"),
    "invalid value": ({"federation": {"tau": 2}}, [], "federation.tau"),
    "bad --set": ({}, ["--set", "federation.tau"], "key.path=value"),
    "ranks vs clients": ({"lora": {"ranks": [1, 2]}}, [], "lora.ranks"),
    "data dir missing": ({"data": {"source": "json", "path": "/nonexistent/dolly"}}, [], "/nonexistent/dolly"),
    "data empty file": ("empty", [], "local_training_1.json"),
    "data malformed json": ("malformed", [], "local_training_1.json"),
    "data missing field": ("missing_field", [], "response"),
    "data client without examples": ("no_examples", [], "client 1"),
    "data client file missing": ("missing_file", [], "local_training_1.json"),
    "model path": ({"model": {"name": "./no_such_model_dir/"}}, [], "model.name"),
    "mmlu file missing": ({"eval": {"kind": "mmlu", "path": "/nonexistent/mmlu.json"}}, [], "mmlu.json"),
    "resume and overwrite": ({}, ["--resume", "--overwrite"], "--resume and --overwrite"),
    "resume without log": ({}, ["--resume"], "does not exist"),
    "target modules match nothing": ({"lora": {"target_modules": ["foo_proj"]}}, [], "lora.target_modules"),
    "steps and epochs both set": ({"train": {"local_epochs": 1}}, [], "train.local_epochs"),
    "precision without matching dtype": ({"train": {"precision": "bf16"}}, [], "model.dtype"),
    "model dir without config.json": ({"model": {"name": "/tmp"}}, [], "no config.json"),
    "fraction above one": ({"federation": {"clients_per_round": 1.5}}, [], "federation.clients_per_round"),
    "negative compute speed": ({"system": {"compute_speed": -1}}, [], "system.compute_speed"),
    "zero bandwidth": ({"system": {"uplink_mbps": 0}}, [], "system.uplink_mbps"),
    "profile list length": ({"system": {"latency_s": [0.1, 0.2]}}, [], "system.latency_s lists 2 values"),
    "missing profile CSV": ({"system": {"downlink_mbps": {"csv": "/nonexistent/links.csv"}}}, [], "links.csv"),
    "overcommit without system": ({"federation": {"overcommit": 0.5}}, [], "federation.overcommit"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, case):
    tree, extra, needle = BAD_INPUTS[case]
    if isinstance(tree, str):
        tree = {"data": {"source": "json", "path": str(bad_data_dir(tmp_path, tree))}}
    config, _ = write_config(tmp_path)
    if "__text__" in tree:
        config.write_text(tree["__text__"])
    else:
        merged = yaml.safe_load(config.read_text())
        for section, values in tree.items():
            merged.setdefault(section, {}).update(values)
        config.write_text(yaml.safe_dump(merged))
    before = snapshot(tmp_path.rglob("*"))
    code = cli_main(["run", str(config), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("florist-mpi: error:") and "\n" not in err and "Traceback" not in err, err
    assert needle in err, err
    assert snapshot(tmp_path.rglob("*")) == before


def test_existing_log_is_never_overwritten_silently(tmp_path, capsys, existing_log):
    config, _ = write_config(tmp_path)
    before = existing_log.read_bytes()
    code = cli_main(["run", str(config), "--set", f"run.output={existing_log}"])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert existing_log.read_bytes() == before


@pytest.mark.parametrize("kind", ["not hdf5", "truncated", "foreign hdf5"])
def test_resume_refuses_files_that_are_not_our_logs(tmp_path, capsys, uninterrupted, kind):
    target = tmp_path / "x.h5"
    if kind == "not hdf5":
        target.write_text("hello")
    elif kind == "truncated":
        target.write_bytes(open(uninterrupted, "rb").read()[:2000])
    else:
        with h5py.File(target, "w") as handle:
            handle["data"] = np.arange(3)
    before = target.read_bytes()
    config, _ = write_config(tmp_path)
    code = cli_main(["run", str(config), "--resume", "--set", f"run.output={target}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and ("not a" in err or "not a readable" in err), err
    assert target.read_bytes() == before


def test_resume_with_changed_config_names_the_key(tmp_path, capsys, uninterrupted):
    config, _ = write_config(tmp_path, run={"rounds": 3}, federation={"method": "fedit"})
    before = open(uninterrupted, "rb").read()
    code = cli_main(["run", str(config), "--resume", "--set", f"run.output={uninterrupted}"])
    err = capsys.readouterr().err
    assert code == 2 and "federation.method" in err
    assert open(uninterrupted, "rb").read() == before


def test_resuming_a_finished_log_does_nothing(tmp_path, capsys, uninterrupted):
    log = tmp_path / "done.h5"
    storage.pack_log(uninterrupted, log)  # a single-file copy: the log file alone would lack its round folder
    before = log.read_bytes()
    config, _ = write_config(tmp_path, run={"rounds": 3})
    code = cli_main(["run", str(config), "--resume", "--set", f"run.output={log}"])
    out = capsys.readouterr()
    assert code == 0 and "already holds all 3 rounds: nothing to do" in out.out, out
    assert log.read_bytes() == before


def test_resuming_with_fewer_rounds_than_logged_is_refused(tmp_path, capsys, uninterrupted):
    log = tmp_path / "done.h5"
    storage.pack_log(uninterrupted, log)  # a single-file copy: the log file alone would lack its round folder
    before = log.read_bytes()
    config, _ = write_config(tmp_path, run={"rounds": 2})
    code = cli_main(["run", str(config), "--resume", "--set", f"run.output={log}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "run.rounds" in err and "\n" not in err, err
    assert log.read_bytes() == before


def test_debug_flag_shows_the_traceback(tmp_path):
    config, _ = write_config(tmp_path, federation={"tau": 2})
    with pytest.raises(Exception, match="federation.tau"):
        cli_main(["run", str(config), "--debug"])


def test_bad_config_under_mpi_fails_before_work_with_one_message(tmp_path):
    config, _ = write_config(tmp_path, federation={"method": "fedavg"})
    result = launch(3, config, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("florist-mpi: error:") == 1 and "federation.method" in result.stderr
