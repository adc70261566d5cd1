"""Export: the PEFT adapter reproduces the run's merged weights; bad requests fail cleanly."""
import json

import h5py
import numpy as np
import pytest
import torch

from florist_mpi.cli import main as cli_main
from test_run import run_ok, write_config

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    logs = {}
    for method in ("florist", "flexlora"):
        config, log = write_config(tmp, f"{method}.yaml", federation={"method": method})
        run_ok(1, config)
        logs[method] = log
    return logs


def merged_from_export(out):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    initial = {name: p.detach().clone() for name, p in base.named_parameters()}
    merged = PeftModel.from_pretrained(base, out).merge_and_unload()
    return initial, dict(merged.named_parameters())


def expected_delta(log, method, last_round):
    with h5py.File(log, "r") as handle:
        rounds = [last_round] if method == "flexlora" else range(last_round + 1)
        delta = {}
        for r in rounds:
            group = handle["rounds"][f"{r:05d}/global"]
            for module in group:
                d = group[module]["B"][()].astype(np.float64) @ group[module]["A"][()]
                delta[module] = delta.get(module, 0) + d
        return delta


@pytest.mark.parametrize("method, round_index", [("florist", 1), ("florist", 0), ("flexlora", 1)])
def test_export_round_trip_through_peft(tmp_path, capsys, runs, method, round_index):
    out = tmp_path / "adapter"
    assert cli_main(["export", runs[method], "--round", str(round_index), "--out", str(out)]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    info = json.loads((out / "florist_export.json").read_text())
    assert info["round"] == round_index and info["method"] == method
    initial, merged = merged_from_export(out)
    for module, delta in expected_delta(runs[method], method, round_index).items():
        name = f"{module}.weight"
        got = (merged[name].double() - initial[name].double()).numpy()
        assert np.allclose(got, delta, atol=1e-5 * max(1.0, np.abs(delta).max())), module


def test_export_refuses_a_missing_round_and_a_used_directory(tmp_path, capsys, runs):
    assert cli_main(["export", runs["florist"], "--round", "7", "--out", str(tmp_path / "a")]) == 2
    assert "round 7 is not in log" in capsys.readouterr().err
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert cli_main(["export", runs["florist"], "--out", str(used)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert (used / "keep.txt").read_text() == "mine" and not (tmp_path / "a").exists()
    bogus = tmp_path / "bogus.h5"
    bogus.write_text("x")
    assert cli_main(["export", str(bogus), "--out", str(tmp_path / "b")]) == 2
    assert "not a readable HDF5" in capsys.readouterr().err


def test_sweep_eval_at_the_runs_tau_reproduces_the_logged_eval_loss(tmp_path, capsys, runs):
    import pandas as pd

    out = tmp_path / "sweep"
    code = cli_main(["sweep-tau", runs["florist"], "--round", "1", "--taus", "0.5,0.95,1.0", "--eval", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    table = pd.read_csv(out / "sweep.csv")
    with h5py.File(runs["florist"], "r") as handle:
        logged = handle["rounds/00001"].attrs["eval_loss"]
    at_run_tau = float(table.loc[table["tau"] == 0.95, "eval_loss"].iloc[0])
    assert abs(at_run_tau - logged) <= 1e-4 * logged
    assert table["eval_loss"].notna().all() and (out / "sweep_eval.png").stat().st_size > 1000
