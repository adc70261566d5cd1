"""FedEx-LoRA (`fedex`) and HetLoRA (`hetlora`): the math against independent numpy computations,
their bytes and server FLOPs, and whole runs (exact global model, resume, report, export)."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from florist_mpi import methods, simclock
from florist_mpi.aggregation import aggregate
from florist_mpi.methods.base import contract_breach

RANKS = (4, 2, 3)
SAMPLES = (10.0, 30.0, 20.0)
M, N = 7, 5


def client_factors(seed=0, ranks=RANKS, m=M, n=N):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((m, r)), rng.standard_normal((r, n))) for r in ranks]


def padded(X, width, axis):
    pad = [(0, 0), (0, 0)]
    pad[axis] = (0, width - X.shape[axis])
    return np.pad(X, pad)


def numpy_average(factors, weights):
    """Σ w_k pad(B_k), Σ w_k pad(A_k): ranks zero-padded to the largest."""
    width = max(B.shape[1] for B, _ in factors)
    B = sum(w * padded(B, width, 1) for w, (B, _) in zip(weights, factors))
    A = sum(w * padded(A, width, 0) for w, (_, A) in zip(weights, factors))
    return B, A


def as_torch(factors):
    return [(torch.from_numpy(B), torch.from_numpy(A)) for B, A in factors]


# ------------------------------------------------------------------ FedEx-LoRA


def test_fedex_averages_like_fedit_and_its_residual_makes_the_update_exact():
    factors = client_factors(1)
    p = np.array(SAMPLES) / sum(SAMPLES)
    B_bar, A_bar = numpy_average(factors, p)
    exact = sum(w * B @ A for w, (B, A) in zip(p, factors))
    result = aggregate("fedex", as_torch(factors), list(SAMPLES), tau=0.5)  # τ is not fedex's business
    assert result.rank == max(RANKS) and result.padded
    np.testing.assert_allclose(result.B.numpy(), B_bar, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(result.A.numpy(), A_bar, rtol=1e-12, atol=1e-12)
    left, right = (x.numpy() for x in result.residual)
    assert left.shape == (M, sum(RANKS) + max(RANKS)) and right.shape == (sum(RANKS) + max(RANKS), N)
    np.testing.assert_allclose(left @ right, exact - B_bar @ A_bar, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(result.B.numpy() @ result.A.numpy() + left @ right, exact, rtol=1e-10, atol=1e-12)
    assert float(np.abs(exact - B_bar @ A_bar).max()) > 0.1  # the residual is not trivially zero here
    assert contract_breach(result, _stack(factors), torch.float64) is None


def test_fedex_leaves_zero_weight_clients_out_of_the_residual():
    factors = client_factors(2)
    result = aggregate("fedex", as_torch(factors), [5.0, 0.0, 5.0], tau=1.0)
    q = RANKS[0] + RANKS[2] + max(RANKS)
    assert result.residual[0].shape == (M, q) and result.residual[1].shape == (q, N)
    exact = 0.5 * (factors[0][0] @ factors[0][1] + factors[2][0] @ factors[2][1])
    total = result.B.numpy() @ result.A.numpy() + result.residual[0].numpy() @ result.residual[1].numpy()
    np.testing.assert_allclose(total, exact, rtol=1e-10, atol=1e-12)


def _stack(factors):
    from florist_mpi.lowrank import stack_factors

    return stack_factors(as_torch(factors))


def test_contract_catches_a_malformed_residual():
    factors = client_factors(3)
    result = aggregate("fedex", as_torch(factors), list(SAMPLES), tau=1.0)
    left, right = result.residual
    result.residual = (left, right[:-1])  # q × n no longer matches m × q
    assert "residual factors" in contract_breach(result, _stack(factors), torch.float64)
    result.residual = (left.float(), right.float())
    assert "residual factors must be torch.float64" in contract_breach(result, _stack(factors), torch.float64)


def test_fedex_downlink_counts_the_residual_in_its_cheaper_form():
    fedex = methods.get("fedex")
    # low-rank form cheaper: q (m + n) < m n
    assert fedex.downlink_floats(4, 2, 100, 80, 12) == 4 * 180 + 12 * 180
    # dense cheaper: q (m + n) = 30 · 15 > m n = 56
    assert fedex.downlink_floats(4, 2, 7, 8, 30) == 4 * 15 + 56
    # every client receives the whole rank-r_max average, whatever its own rank
    assert fedex.downlink_floats(4, 1, 100, 80, 0) == 4 * 180
    shapes = {"q": (100, 80), "v": (7, 8)}
    got = simclock.download_bytes("fedex", shapes, {"q": 4, "v": 4}, 2, {"q": 12, "v": 30})
    assert got == 4 * (4 * 180 + 12 * 180 + 4 * 15 + 56)
    assert simclock.upload_bytes("fedex", shapes, 3) == 4 * 3 * (180 + 15)


def test_fedex_and_hetlora_plans_are_the_hand_counts():
    m, n, K, R, r_max = 300, 200, 5, 19, 6
    fedex = methods.get("fedex").plan(m, n, K, R, r_max, r_max)
    assert fedex.flops == 2 * R * (m + n) + m * r_max
    het = methods.get("hetlora").plan(m, n, K, R, r_max, r_max)
    assert het.flops == 2 * K * r_max**2 * (m + n) + 2 * K * r_max**2 + 2 * R * (m + n)
    ranks = [6, 4, 4, 3, 2]
    for name in ("fedex", "hetlora"):
        want = methods.get(name).plan(m, n, 5, sum(ranks), 6, 6).flops
        assert simclock.aggregation_flops(name, {"w": (m, n)}, ranks, {"w": 6}) == want


# ------------------------------------------------------------------ HetLoRA


def test_hetlora_weights_clients_by_the_norms_of_their_updates():
    factors = client_factors(4)
    norms = np.array([np.linalg.norm(B @ A, "fro") for B, A in factors])  # formed densely, here only
    w = norms / norms.sum()
    B_bar, A_bar = numpy_average(factors, w)
    result = aggregate("hetlora", as_torch(factors), list(SAMPLES), tau=1.0)
    assert result.rank == max(RANKS) and result.padded
    np.testing.assert_allclose(result.B.numpy(), B_bar, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(result.A.numpy(), A_bar, rtol=1e-12, atol=1e-12)
    # sample counts do not enter (the paper's weights): other counts, the same result
    again = aggregate("hetlora", as_torch(factors), [1.0, 1.0, 1.0], tau=1.0)
    assert torch.equal(again.B, result.B) and torch.equal(again.A, result.A)
    # each client receives the global adapter truncated to its own rank
    assert result.client_ranks.tolist() == list(RANKS)
    for (B, A), r in zip(result.client_factors, RANKS):
        np.testing.assert_array_equal(B.numpy(), result.B.numpy()[:, :r])
        np.testing.assert_array_equal(A.numpy(), result.A.numpy()[:r])
    assert contract_breach(result, _stack(factors), torch.float64) is None


def test_hetlora_update_norms_match_dense_norms_and_skip_empty_clients():
    from florist_mpi.lowrank import update_norms

    factors = client_factors(5, ranks=(3, 1, 5), m=40, n=9)
    want = [np.linalg.norm(B @ A, "fro") for B, A in factors]
    np.testing.assert_allclose(update_norms(_stack(factors)).numpy(), want, rtol=1e-12)
    # a client without samples is left out; an all-zero round falls back to the sample weights
    result = aggregate("hetlora", as_torch(factors), [1.0, 0.0, 1.0], tau=1.0)
    w = np.array([want[0], 0.0, want[2]]) / (want[0] + want[2])
    np.testing.assert_allclose(result.B.numpy(), numpy_average(factors, w)[0], rtol=1e-12, atol=1e-12)
    zeros = [(np.zeros_like(B), A) for B, A in factors]
    flat = aggregate("hetlora", as_torch(zeros), [1.0, 1.0, 2.0], tau=1.0)
    np.testing.assert_allclose(flat.A.numpy(), numpy_average(zeros, [0.25, 0.25, 0.5])[1], rtol=1e-12)


def test_hetlora_downlink_is_each_clients_truncation():
    shapes = {"q": (100, 80), "v": (7, 8)}
    for client_rank in (1, 4, 6):
        got = simclock.download_bytes("hetlora", shapes, {"q": 4, "v": 4}, client_rank)
        assert got == 4 * min(client_rank, 4) * (180 + 15)
    assert simclock.upload_bytes("hetlora", shapes, 3) == 4 * 3 * (180 + 15)


def test_both_are_registered_after_the_paper_methods():
    assert methods.names()[:7] == ("florist", "fedit", "flora", "flexlora", "ffa", "fedex", "hetlora")
    assert methods.get("fedex").keeps_base and methods.get("fedex").folds_residual
    assert methods.get("hetlora").keeps_base and not methods.get("hetlora").folds_residual


# ------------------------------------------------------------------ whole runs


DEMO_SMALL = ["--set", "run.rounds=2", "--set", "train.local_steps=2", "--set", "data.synthetic.examples_per_client=16",
              "--set", "data.synthetic.eval_examples=32"]


def demo_run(tmp_path, method, ranks=1):
    from conftest import REPO
    from test_run import run_ok

    log = tmp_path / f"{method}.h5"
    run_ok(ranks, REPO / "configs/demo.yaml", "--set", f"federation.method={method}", "--set", f"run.output={log}",
           *DEMO_SMALL)
    return log


def logged_round(log, round_index):
    """(client id -> module -> (B, A) float64, client id -> p_k, module -> global (B, A), module -> residual)."""
    with h5py.File(log, "r") as handle:
        group = handle[f"rounds/{round_index:05d}"]
        samples = dict(zip(group["clients/id"][()].tolist(), group["clients/num_samples"][()].tolist()))
        adapters = {
            int(c): {m: (node[m]["B"][()].astype(np.float64), node[m]["A"][()].astype(np.float64)) for m in node}
            for c, node in group["client_adapters"].items()
        }
        total = sum(samples[c] for c in adapters)
        p = {c: samples[c] / total for c in adapters}
        glob = {m: (node["B"][()].astype(np.float64), node["A"][()].astype(np.float64))
                for m, node in group["global"].items()}
        residual = {m: (node["residual_B"][()].astype(np.float64), node["residual_A"][()].astype(np.float64))
                    for m, node in group["global"].items() if "residual_B" in node}
        attrs = dict(group.attrs)
    return adapters, p, glob, residual, attrs


def exact_update(adapters, p, module):
    return sum(p[c] * adapters[c][module][0] @ adapters[c][module][1] for c in adapters)


def shapes_of(glob):
    return {m: (B.shape[0], A.shape[1]) for m, (B, A) in glob.items()}


@pytest.fixture(scope="module")
def fedex_log(tmp_path_factory):
    return demo_run(tmp_path_factory.mktemp("fedex"), "fedex", ranks=2)


@pytest.mark.mpi
def test_fedex_run_global_model_is_base_plus_the_exact_updates(fedex_log):
    """After round 0 the global model is W_0 + ΔW_0; after round 1, W_0 + (ΔW_0 − B̄_0 Ā_0) + ΔW_1: the
    residual of round 0 stays in the base and round 1's clients started from B̄_0 Ā_0. Both from the client
    adapters alone (numpy), against the model rebuilt from the log, and the logged eval loss."""
    from florist_mpi import replay, storage
    from florist_mpi.model import adapted_modules

    cfg = replay.logged_config(fedex_log)
    model, tokenizer = replay.load_initial_base(cfg)
    modules = adapted_modules(model, cfg.lora.target_modules)
    initial = {name: module.weight.detach().double().numpy().copy() for name, module in modules.items()}
    rounds = [logged_round(fedex_log, r) for r in (0, 1)]
    kept_before = {}
    for r, (adapters, p, glob, residual, attrs) in enumerate(rounds):
        ranks = {c: next(iter(adapters[c].values()))[0].shape[1] for c in adapters}
        for module, (B, A) in glob.items():
            delta = exact_update(adapters, p, module)
            B_bar, A_bar = numpy_average([adapters[c][module] for c in adapters], [p[c] for c in adapters])
            np.testing.assert_allclose(B, B_bar, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(A, A_bar, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(B @ A + residual[module][0] @ residual[module][1], delta,
                                       rtol=1e-4, atol=1e-5 * np.abs(delta).max())
            assert residual[module][0].shape[1] == sum(ranks.values()) + max(ranks.values())
        # bytes: every one of the 8 clients receives B̄, Ā (rank r_max) and the residual, whichever form is smaller
        down = sum(B.shape[1] * (B.shape[0] + A.shape[1]) + min(residual[m][0].shape[1] * (B.shape[0] + A.shape[1]),
                                                                B.shape[0] * A.shape[1])
                   for m, (B, A) in glob.items())
        assert attrs["bytes_down"] == 4 * cfg.federation.num_clients * down
        up = sum(ranks[c] * (m + n) for c in adapters for m, n in shapes_of(glob).values())
        assert attrs["bytes_up"] == 4 * up
        with storage.open_log(fedex_log) as handle:
            masters = replay.merge_rounds_before(modules, fedex_log, cfg, r + 1)  # the base: residuals of 0..r
            factors = storage.read_global_factors(handle, r)
        with replay.temporarily_merged(modules, factors, masters):
            for name, module in modules.items():
                want = initial[name] + kept_before.get(name, 0.0) + exact_update(adapters, p, name)
                got = module.weight.detach().double().numpy()
                assert np.abs(got - want).max() <= 1e-5 * (np.abs(want).max()), name
            loss, _ = replay.Evaluator(cfg, model, tokenizer)()
            assert loss == pytest.approx(float(attrs["eval_loss"]), rel=1e-5)
        for name in modules:  # round r's residual stays in the base for the rounds after it
            kept_before[name] = kept_before.get(name, 0.0) + residual[name][0] @ residual[name][1]
        for name, module in modules.items():  # undo the merge of rounds 0..r for the next round's rebuild
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(initial[name]).to(module.weight.dtype))


@pytest.mark.mpi
def test_fedex_resume_gives_the_uninterrupted_log(tmp_path, fedex_log):
    from conftest import REPO
    from test_run import run_ok

    log = tmp_path / "resumed.h5"
    common = ["--set", "federation.method=fedex", "--set", f"run.output={log}", *DEMO_SMALL]
    run_ok(2, REPO / "configs/demo.yaml", *common, "--set", "run.rounds=1")
    run_ok(2, REPO / "configs/demo.yaml", *common, "--resume")
    for r in (0, 1):
        full, resumed = logged_round(fedex_log, r), logged_round(log, r)
        for part in (0, 2, 3):  # client adapters, global factors, residuals
            assert full[part].keys() == resumed[part].keys()
        for module, pair in full[3].items():
            assert all(np.array_equal(x, y) for x, y in zip(pair, resumed[3][module])), (r, module)
        for module, pair in full[2].items():
            assert all(np.array_equal(x, y) for x, y in zip(pair, resumed[2][module])), (r, module)
        assert full[4]["bytes_down"] == resumed[4]["bytes_down"] and full[4]["eval_loss"] == resumed[4]["eval_loss"]


@pytest.mark.mpi
def test_hetlora_run_aggregates_with_norm_weights_and_sends_truncations(tmp_path):
    from florist_mpi.cli import main as cli_main

    log = demo_run(tmp_path, "hetlora")
    for r in (0, 1):
        adapters, _, glob, residual, attrs = logged_round(log, r)
        assert not residual
        clients = sorted(adapters)
        ranks = {c: next(iter(adapters[c].values()))[0].shape[1] for c in clients}
        for module, (B, A) in glob.items():
            norms = np.array([np.linalg.norm(adapters[c][module][0] @ adapters[c][module][1]) for c in clients])
            B_bar, A_bar = numpy_average([adapters[c][module] for c in clients], norms / norms.sum())
            np.testing.assert_allclose(B, B_bar, rtol=1e-4, atol=1e-6 * np.abs(B_bar).max())
            np.testing.assert_allclose(A, A_bar, rtol=1e-4, atol=1e-6 * np.abs(A_bar).max())
        down = sum(min(ranks[c], B.shape[1]) * (B.shape[0] + A.shape[1]) for c in clients for B, A in glob.values())
        assert attrs["bytes_down"] == 4 * down  # the demo's 8 clients all take part
    assert cli_main(["report", str(log)]) == 0
    out = tmp_path / "adapter"
    assert cli_main(["export", str(log), "--out", str(out), "--no-base"]) == 0
    from safetensors.numpy import load_file

    tensors = load_file(out / "adapter_model.safetensors")
    _, _, glob, _, _ = logged_round(log, 1)
    for module, (B, A) in glob.items():  # the global model is base + the last round's B̄Ā
        key = f"base_model.model.{module}.lora_"
        got = tensors[key + "B.weight"].astype(np.float64) @ tensors[key + "A.weight"].astype(np.float64)
        assert np.abs(got - B @ A).max() <= 1e-5 * np.abs(B @ A).max(), module


@pytest.mark.mpi
def test_fedex_report_and_export(tmp_path, fedex_log):
    from safetensors.numpy import load_file

    from florist_mpi.cli import main as cli_main

    assert cli_main(["report", str(fedex_log)]) == 0
    out = tmp_path / "adapter"
    assert cli_main(["export", str(fedex_log), "--out", str(out), "--no-base"]) == 0
    tensors = load_file(out / "adapter_model.safetensors")
    _, _, glob0, residual0, _ = logged_round(fedex_log, 0)
    _, _, glob1, residual1, _ = logged_round(fedex_log, 1)
    for module, (B, A) in glob1.items():  # both residuals in the base, round 1's B̄Ā beside it
        want = residual0[module][0] @ residual0[module][1] + residual1[module][0] @ residual1[module][1] + B @ A
        key = f"base_model.model.{module}.lora_"
        got = tensors[key + "B.weight"].astype(np.float64) @ tensors[key + "A.weight"].astype(np.float64)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), module
