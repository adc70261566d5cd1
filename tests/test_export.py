"""Export: the PEFT adapter reproduces the run's merged weights and eval loss; bad requests fail cleanly.

Also the checks of sweep-tau that need a real run (its eval and downlink at the run's τ).
"""
import json
import math
import re

import h5py
import numpy as np
import pytest
import torch
from test_run import run_ok, write_config

from florist_mpi.cli import main as cli_main

pytestmark = pytest.mark.mpi

EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    logs = {}
    for method in ("florist", "flexlora"):
        config, log = write_config(tmp, f"{method}.yaml", federation={"method": method})
        run_ok(1, config)
        logs[method] = log
    return logs


def logged_round_attr(log, round_index, key):
    with h5py.File(log, "r") as handle:
        return handle[f"rounds/{round_index:05d}"].attrs[key]


def replayed_model(log, round_index):
    """The run's global model after the round, rebuilt from the initial base and the logged updates."""
    from florist_mpi import replay, storage
    from florist_mpi.model import adapted_modules, merge_update

    cfg = replay.logged_config(log)
    model, tokenizer = replay.load_initial_base(cfg)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    modules = adapted_modules(model, cfg.lora.target_modules)
    replay.merge_rounds_before(modules, log, cfg, round_index + 1)  # rounds 0..R (nothing for FlexLoRA)
    if cfg.federation.method == "flexlora":  # its global model is the base plus the round's update
        with storage.open_log(log) as handle:
            merge_update(modules, storage.read_global_factors(handle, round_index))
    return cfg, model, tokenizer, initial, set(modules)


def merged_from_export(out):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    return PeftModel.from_pretrained(base, out).merge_and_unload().eval()


@pytest.mark.parametrize("method, round_arg, round_index", [("florist", "1", 1), ("florist", "0", 0),
                                                            ("flexlora", "-1", 1)])
def test_export_round_trip_through_peft(tmp_path, capsys, runs, method, round_arg, round_index):
    from florist_mpi.replay import Evaluator

    out = tmp_path / "adapter"
    assert cli_main(["export", runs[method], "--round", round_arg, "--out", str(out)]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    info = json.loads((out / "florist_export.json").read_text())
    assert info["round"] == round_index and info["method"] == method

    cfg, replayed, tokenizer, initial, adapted = replayed_model(runs[method], round_index)
    merged = merged_from_export(out)
    merged_params = dict(merged.named_parameters())
    for name, want in replayed.named_parameters():
        got = merged_params[name].detach()
        module = name.removesuffix(".weight")
        if module not in adapted:
            assert torch.equal(got, want), name  # the exported base is the run's initial base
            continue
        delta = (want.double() - initial[name].double()).abs().max().item()
        assert delta > 0, name  # every adapted module was updated: the comparison below is not vacuous
        # float32 rounding of W + ΔW (one merge vs one per round) is a few ulps of |W| + |ΔW|
        scale = initial[name].abs().max().item() + delta
        error = (got.double() - want.double()).abs().max().item()
        assert error <= 8 * (round_index + 1) * EPS32 * scale, (name, error, delta)
        assert error <= 1e-4 * delta, (name, error, delta)

    # the exported model is the run's global model: its held-out loss is the logged one
    loss, _ = Evaluator(cfg, merged, tokenizer)()
    logged = float(logged_round_attr(runs[method], round_index, "eval_loss"))
    assert math.isfinite(logged) and abs(loss - logged) <= 1e-4 * logged, (loss, logged)


def test_adapter_keys_and_ranks_are_what_peft_itself_saves(tmp_path, runs):
    """The file's tensor names and shapes equal those of PEFT's own state dict for the same config."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    assert cli_main(["export", runs["florist"], "--out", str(out)]) == 0
    saved = load_file(out / "adapter_model.safetensors")
    config = LoraConfig.from_pretrained(out)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(out / "base_model"), config)
    own = get_peft_model_state_dict(model)
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in own.items()}
    ranks = json.loads((out / "florist_export.json").read_text())["modules"]
    for name, rank in ranks.items():
        assert saved[f"base_model.model.{name}.lora_A.weight"].shape[0] == rank
        assert config.rank_pattern[name] == config.alpha_pattern[name] == rank  # scaling α/r = 1


def test_export_of_a_packed_log_equals_the_export_of_the_log(tmp_path, capsys, runs):
    from safetensors.numpy import load_file

    packed = tmp_path / "packed.h5"
    assert cli_main(["pack", runs["florist"], str(packed)]) == 0
    exported = {}
    for name, log in (("split", runs["florist"]), ("packed", str(packed))):
        assert cli_main(["export", log, "--no-base", "--out", str(tmp_path / name)]) == 0
        exported[name] = load_file(tmp_path / name / "adapter_model.safetensors")
    assert exported["split"].keys() == exported["packed"].keys() and exported["split"]
    for key, value in exported["split"].items():
        np.testing.assert_array_equal(value, exported["packed"][key])


def test_export_refuses_a_missing_round_and_a_used_directory(tmp_path, capsys, runs):
    assert cli_main(["export", runs["florist"], "--round", "7", "--out", str(tmp_path / "a")]) == 2
    assert "round 7 is not in log" in capsys.readouterr().err
    assert cli_main(["export", runs["florist"], "--round", "-3", "--out", str(tmp_path / "a")]) == 2
    assert "round -3 is not in log" in capsys.readouterr().err  # negative rounds count from the end, as in sweep-tau
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bogus.h5", "used"]  # no scratch folder left


def test_sweep_eval_at_the_runs_tau_reproduces_the_logged_eval_loss(tmp_path, capsys, runs):
    import pandas as pd

    out = tmp_path / "sweep"
    argv = ["sweep-tau", runs["florist"], "--round", "1", "--taus", "0.5,0.95,1.0", "--eval", "--out", str(out)]
    code = cli_main(argv)
    assert code == 0, capsys.readouterr().err
    table = pd.read_csv(out / "sweep.csv")
    logged = logged_round_attr(runs["florist"], 1, "eval_loss")
    at_run_tau = float(table.loc[table["tau"] == 0.95, "eval_loss"].iloc[0])
    assert abs(at_run_tau - logged) <= 1e-4 * logged
    assert table["eval_loss"].notna().all() and (out / "sweep_eval.png").stat().st_size > 1000


def test_sweep_eval_on_cuda_without_cuda_is_refused_in_one_line_and_writes_nothing(tmp_path, capsys, runs,
                                                                                   monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "sweep"
    argv = ["sweep-tau", runs["florist"], "--taus", "0.9", "--eval", "--device", "cuda", "--out", str(out)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the --eval device is cuda but" in err[0] and "pass --device cpu" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("round_index", [0, 1])
def test_sweep_downlink_at_the_runs_tau_equals_the_logged_bytes_down(tmp_path, capsys, runs, round_index):
    import pandas as pd

    out = tmp_path / "sweep"
    code = cli_main(
        ["sweep-tau", runs["florist"], "--round", str(round_index), "--taus", "0.95", "--csv", "--out", str(out)]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    logged = int(logged_round_attr(runs["florist"], round_index, "bytes_down"))
    table = pd.read_csv(out / "sweep.csv")
    assert int(table["down_bytes_total"].iloc[0]) == logged
    assert f"({logged} B): equal" in captured.err
    info = json.loads((out / "sweep.json").read_text())
    assert info["logged_bytes_down"] == info["sweep_bytes_down_at_run_tau"] == logged


def _peft_013_rule(keys, module):
    """PEFT 0.13/0.14: `next(filter(lambda key: re.match(rf".*\\.{key}$", module), keys), module)`."""
    return next(filter(lambda key: re.match(rf".*\.{key}$", module), keys), module)


def test_rank_pattern_keys_resolve_in_old_and_new_peft():
    from peft.utils.other import get_pattern_key  # the installed rule (PEFT >= 0.15: "(.*\.)?key$")

    from florist_mpi.export import adapter_config

    names = [
        "model.layers.1.self_attn.q_proj",
        "model.layers.11.self_attn.q_proj",
        "lm_head",
        "model.layers.1.mlp.down_proj",
    ]
    nested = "language_model.model.layers.1.mlp.down_proj"  # ends in ".model.layers.1.mlp.down_proj"
    for adapted, rules in ((names, (_peft_013_rule, get_pattern_key)), (names + [nested], (get_pattern_key,))):
        factors = {
            name: (np.ones((4, rank), np.float32), np.ones((rank, 3), np.float32))
            for rank, name in enumerate(adapted, start=1)
        }
        config = adapter_config(factors, "base")
        for rank, name in enumerate(adapted, start=1):
            for rule in rules:
                key = rule(list(config.rank_pattern), name)
                assert config.rank_pattern.get(key, config.r) == rank, (rule.__name__, name, key)
                assert config.alpha_pattern.get(key, config.lora_alpha) == rank, (rule.__name__, name, key)
    # PEFT 0.13/0.14 cannot tell a module from a longer one ending in its name (PEFT >= 0.15 can)
    assert _peft_013_rule(list(config.rank_pattern), nested) == "model.layers.1.mlp.down_proj"
