"""End-to-end federated runs under real mpiexec, checked against independent computations."""
from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
import yaml
from conftest import florist_cli, run_mpi

from florist_mpi.aggregation import aggregate
from florist_mpi.storage import read_global_factors

pytestmark = pytest.mark.mpi

SMALL = {
    "run": {"rounds": 2, "seed": 3},
    "federation": {"num_clients": 4, "method": "florist", "tau": 0.95},
    "model": {"tiny": {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2}},
    "lora": {"ranks": [4, 2, 2, 1], "alpha": "2r", "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "data": {"synthetic": {"examples_per_client": 24, "eval_examples": 32}, "max_length": 48},
    "train": {"local_steps": 3, "micro_batch_size": 4, "lr": 0.01},
    "eval": {"every": 1, "batch_size": 16},
    "log": {"client_adapters": True},
}


def write_config(tmp_path, name="cfg.yaml", **sections):
    tree = yaml.safe_load(yaml.safe_dump(SMALL))
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    tree["run"]["output"] = str(tmp_path / (name.removesuffix(".yaml") + ".h5"))
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path, tree["run"]["output"]


def launch(ranks, config, *extra, timeout=600, env=None):
    result = run_mpi(ranks, [*florist_cli(), "run", str(config), *extra], timeout=timeout, env=env)
    return result


def run_ok(ranks, config, *extra, **kwargs):
    result = launch(ranks, config, *extra, **kwargs)
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    )
    return result


@pytest.fixture(scope="module")
def florist_runs(tmp_path_factory):
    """The same config on 1, 2 and 3 ranks."""
    tmp = tmp_path_factory.mktemp("florist")
    logs = {}
    for ranks in (1, 2, 3):
        config, log = write_config(tmp, f"r{ranks}.yaml")
        result = run_ok(ranks, config)
        logs[ranks] = (log, result)
    return logs


def client_factors(handle, round_index):
    group = handle["rounds"][f"{round_index:05d}"]
    excluded = set(group["clients/excluded"][()].tolist())
    ids = [int(c) for c in group["clients/id"][()] if int(c) not in excluded]
    samples = {int(c): int(n) for c, n in zip(group["clients/id"][()], group["clients/num_samples"][()])}
    adapters = group["client_adapters"]
    modules = list(adapters[str(ids[0])].keys())
    per_module = {
        m: [
            (torch.from_numpy(adapters[str(c)][m]["B"][()]), torch.from_numpy(adapters[str(c)][m]["A"][()]))
            for c in ids
        ]
        for m in modules
    }
    return per_module, [samples[c] for c in ids]


def assert_global_matches_clients(log, method, tau, atol=1e-5):
    with h5py.File(log, "r") as handle:
        for round_index in range(len(handle["rounds"])):
            per_module, weights = client_factors(handle, round_index)
            logged = read_global_factors(handle, round_index)
            for module, factors in per_module.items():
                expected = aggregate(method, factors, weights, tau=tau)
                B, A = logged[module]
                assert (
                    B.shape[1] == expected.rank == handle["rounds"][f"{round_index:05d}/global/{module}"].attrs["rank"]
                )
                got = B.astype(np.float64) @ A.astype(np.float64)
                want = (expected.B.double() @ expected.A.double()).numpy()
                scale = max(1.0, np.abs(want).max())
                assert np.abs(got - want).max() <= atol * scale, (method, round_index, module)


def test_logged_global_equals_aggregate_of_logged_clients(florist_runs):
    log, _ = florist_runs[2]
    assert_global_matches_clients(log, "florist", tau=0.95)


def test_result_does_not_depend_on_rank_count(florist_runs):
    reference = florist_runs[1][0]
    with h5py.File(reference, "r") as ref:
        for ranks in (2, 3):
            with h5py.File(florist_runs[ranks][0], "r") as other:
                assert other.attrs["world_size"] == ranks
                for round_index in range(2):
                    a, b = read_global_factors(ref, round_index), read_global_factors(other, round_index)
                    for module in a:
                        delta_a = a[module][0].astype(np.float64) @ a[module][1]
                        delta_b = b[module][0].astype(np.float64) @ b[module][1]
                        assert np.allclose(delta_a, delta_b, rtol=1e-4, atol=1e-6), (ranks, round_index, module)
                    loss_a = ref["rounds"][f"{round_index:05d}"].attrs["eval_loss"]
                    loss_b = other["rounds"][f"{round_index:05d}"].attrs["eval_loss"]
                    assert math.isclose(loss_a, loss_b, rel_tol=1e-4)


def test_clients_are_isolated(florist_runs):
    """Different data -> different adapters; and no rank's result depends on its neighbours."""
    log, _ = florist_runs[3]
    with h5py.File(log, "r") as handle:
        adapters = handle["rounds/00000/client_adapters"]
        module = list(adapters["1"].keys())[0]
        b1, b2 = adapters["1"][module]["B"][()], adapters["2"][module]["B"][()]
        assert b1.shape == b2.shape  # both rank 2
        assert not np.allclose(b1, b2)
    with h5py.File(florist_runs[1][0], "r") as single:
        # Client 1 alone on its rank (3 ranks) vs sharing a rank with everyone (1 rank):
        # with gradients coupled across ranks by DeepSpeed these would differ.
        alone = single["rounds/00000/client_adapters/1"][module]["B"][()]
        assert np.allclose(alone, b1, rtol=1e-4, atol=1e-6)


def test_log_matches_documented_schema(florist_runs):
    log, _ = florist_runs[2]
    with h5py.File(log, "r") as handle:
        for key in (
            "format_version",
            "config",
            "method",
            "tau",
            "num_clients",
            "world_size",
            "versions",
            "modules",
            "module_shapes",
            "created",
            "initial_eval_loss",
        ):
            assert key in handle.attrs, key
        assert handle.attrs["method"] == "florist" and handle.attrs["num_clients"] == 4
        assert yaml.safe_load(handle.attrs["config"])["federation"]["tau"] == 0.95
        assert sorted(handle["rounds"].keys()) == ["00000", "00001"]
        modules = [m if isinstance(m, str) else m.decode() for m in handle.attrs["modules"]]
        assert len(modules) == 3  # one layer: q_proj, v_proj, down_proj
        for round_index in ("00000", "00001"):
            group = handle["rounds"][round_index]
            for key in (
                "tau",
                "time_train",
                "time_gather",
                "time_aggregate",
                "time_broadcast",
                "time_merge",
                "bytes_up",
                "bytes_down",
                "eval_loss",
            ):
                assert key in group.attrs, key
            shapes = dict(zip(modules, (tuple(int(x) for x in mn) for mn in handle.attrs["module_shapes"])))
            per_rank_floats = sum(m + n for m, n in shapes.values())
            assert group.attrs["bytes_up"] == 4 * sum((4, 2, 2, 1)) * per_rank_floats
            down = sum(group["global"][mod].attrs["rank"] * (m + n) for mod, (m, n) in shapes.items())
            assert group.attrs["bytes_down"] == 4 * 4 * down  # every one of the 4 clients receives it
            assert list(group["clients/id"][()]) == [0, 1, 2, 3]
            assert list(group["clients/rank"][()]) == [4, 2, 2, 1]
            assert np.isfinite(group["clients/train_loss"][()]).all()
            for module, (m, n) in zip(modules, handle.attrs["module_shapes"]):
                node = group["global"][module]
                r = node.attrs["rank"]
                assert node["B"].shape == (m, r) and node["A"].shape == (r, n)
                assert node["B"].dtype == np.float32 and len(node["singular_values"]) >= r
            for client in ("0", "1", "2", "3"):
                assert set(group["client_adapters"][client].keys()) == set(modules)


def test_progress_lines_from_rank_zero_only(florist_runs):
    _, result = florist_runs[3]
    # rounds are numbered from 0 as in the log, report and --round; (k/N) counts them
    assert result.stdout.count("round 0 (1/2)") == 1 and result.stdout.count("round 1 (2/2)") == 1
    assert "eval loss" in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    # banner, one line per round, the closing line: nothing from the other ranks or the libraries
    assert len(lines) == 4 and lines[0].startswith("florist-mpi starting") and lines[-1].startswith("done:"), lines


def test_partial_participation_with_epochs_and_gradient_accumulation(tmp_path):
    """2 of 4 clients per round on 3 ranks (a rank may host nobody), epochs, accumulation."""
    from florist_mpi.clients import sample_participants
    from florist_mpi.config import load_config

    config, log = write_config(
        tmp_path,
        federation={"clients_per_round": 2},
        train={"local_steps": None, "local_epochs": 0.5, "gradient_accumulation_steps": 2},
    )
    run_ok(3, config)
    cfg = load_config(config)
    with h5py.File(log, "r") as handle:
        for round_index in range(2):
            group = handle["rounds"][f"{round_index:05d}"]
            assert group["clients/id"][()].tolist() == sample_participants(cfg, round_index)
            assert len(group["client_adapters"]) == 2
    assert_global_matches_clients(log, "florist", tau=0.95)


@pytest.mark.parametrize("method", ["fedit", "flora", "flexlora", "ffa"])
def test_baselines_log_their_own_aggregate(tmp_path, method):
    config, log = write_config(tmp_path, federation={"method": method})
    run_ok(2, config)
    assert_global_matches_clients(log, method, tau=0.95)
    with h5py.File(log, "r") as handle:
        ranks = {m: handle["rounds/00000/global"][m].attrs["rank"] for m in handle["rounds/00000/global"]}
        expected = {"fedit": 4, "flora": 9, "flexlora": 4, "ffa": 4}[method]
        assert set(ranks.values()) == {expected}
        if method == "ffa":  # A is frozen and shared: every client's A is a prefix of the global A
            adapters = handle["rounds/00001/client_adapters"]
            module = next(iter(adapters["0"].keys()))
            global_A = handle["rounds/00001/global"][module]["A"][()]
            for client, r in zip("0123", (4, 2, 2, 1)):
                assert np.array_equal(adapters[client][module]["A"][()], global_A[:r])


def test_demo_config_learns(tmp_path):
    """The shipped demo as the README runs it (4 ranks, every round) shows a clearly falling eval loss."""
    log = tmp_path / "demo.h5"
    result = run_ok(4, "configs/demo.yaml", "--set", f"run.output={log}")
    with h5py.File(log, "r") as handle:
        initial = handle.attrs["initial_eval_loss"]
        losses = [handle["rounds"][k].attrs["eval_loss"] for k in sorted(handle["rounds"].keys())]
    assert len(losses) == 8
    assert losses[-1] < 0.7 * initial, (initial, losses, result.stdout[-2000:])
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_model_from_a_local_directory(tmp_path):
    """model.name may be a local Hugging Face model directory (here: a saved tiny model)."""
    from florist_mpi import data as data_lib
    from florist_mpi.config import config_from_tree
    from florist_mpi.model import build_tiny_model

    config, log = write_config(tmp_path, run={"rounds": 1})
    cfg = config_from_tree(yaml.safe_load(config.read_text()))
    tokenizer = data_lib.build_tokenizer(data_lib.client_records(cfg.data, 4, 0)[0], 200)
    model = build_tiny_model(
        cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    model.save_pretrained(tmp_path / "my-model")
    tokenizer.save_pretrained(tmp_path / "my-model")
    result = run_ok(1, config, "--set", f"model.name={tmp_path / 'my-model'}")
    assert "round 0 (1/1)" in result.stdout
    with h5py.File(log, "r") as handle:
        assert math.isfinite(handle["rounds/00000"].attrs["eval_loss"])


def test_first_deepspeed_build_is_safe_with_concurrent_ranks_and_a_stale_lock(tmp_path):
    """Three ranks start with an empty extension cache and a lock left by a killed build."""
    from conftest import mpi_env

    extensions = tmp_path / "torch_extensions"
    import sys

    stale = extensions / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / "deepspeed_shm_comm"
    stale.mkdir(parents=True)
    (stale / "lock").write_text("")  # torch's own build lock, as a killed build leaves it
    env = mpi_env()
    env["TORCH_EXTENSIONS_DIR"] = str(extensions)
    config, log = write_config(tmp_path, run={"rounds": 1})
    run_ok(3, config, env=env, timeout=400)
    assert list(extensions.rglob("deepspeed_shm_comm*.so"))


@pytest.mark.parametrize("layout", ["files", "dirichlet"])
def test_runs_on_dolly_format_data(tmp_path, layout):
    from conftest import SHARED_DATA

    dolly = SHARED_DATA / "dolly-8clients"
    if not dolly.is_dir():
        pytest.skip("../shared/data/dolly-8clients is not beside the checkout")
    data = {"source": "json", "path": str(dolly), "partition": "files", "max_length": 64, "tokenizer_vocab_size": 512}
    clients = 8
    if layout == "dirichlet":
        data.update(
            path=str(dolly / "local_training_1.json"),
            partition="dirichlet",
            dirichlet_alpha=0.5,
            eval_path=str(dolly / "global_test.json"),
        )
        clients = 4
    config, log = write_config(
        tmp_path,
        run={"rounds": 1},
        data=data,
        federation={"num_clients": clients},
        lora={"ranks": None, "rank": 2},
        train={"local_steps": 2},
        eval={"max_examples": 16},
    )
    run_ok(2, config)
    with h5py.File(log, "r") as handle:
        sizes = handle["rounds/00000/clients/num_samples"][()].tolist()
        if layout == "files":
            assert sizes == [1579, 685, 3775, 1830, 2152, 1776, 2531, 607]
        else:
            assert sum(sizes) == 685 and min(sizes) >= 1
        assert math.isfinite(handle["rounds/00000"].attrs["eval_loss"])


def test_held_out_warm_up_leaves_the_clients_the_rest(tmp_path):
    """model.warmup_data: held_out — every client trains on (and is weighted by) what the warm-up left it."""
    config, log = write_config(
        tmp_path,
        run={"rounds": 1},
        model={"warmup_steps": 4, "warmup_data": "held_out", "warmup_fraction": 0.25, "warmup_text": "instructions"},
    )
    run_ok(2, config)
    per_client = SMALL["data"]["synthetic"]["examples_per_client"]
    with h5py.File(log, "r") as handle:
        sizes = handle["rounds/00000/clients/num_samples"][()].tolist()
        assert sizes == [per_client - math.floor(0.25 * per_client)] * 4
        assert math.isfinite(handle["rounds/00000"].attrs["eval_loss"])
