"""Aggregation math against independent dense computations in float64."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from florist_mpi.aggregation import aggregate, aggregate_adapter, select_rank
from florist_mpi.methods import names

METHODS = names()  # the built-in methods (the registry at collection time)


def clients(ranks, m=40, n=32, seed=0, dtype=torch.float32, decay=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in ranks:
        B = torch.randn(m, r, generator=g, dtype=torch.float64)
        A = torch.randn(r, n, generator=g, dtype=torch.float64)
        if decay:  # spectra that decay, like trained adapters
            B = B * torch.logspace(0, -3, r, dtype=torch.float64)
        out.append((B.to(dtype), A.to(dtype)))
    return out


def dense_sum(factors, weights):
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    p = w / w.sum()
    return sum(pk * B.double() @ A.double() for pk, (B, A) in zip(p, factors))


def product(result):
    return result.B.double() @ result.A.double()


def rel_err(X, Y):
    return float((X - Y).norm() / max(float(Y.norm()), 1e-300))


RANKS = [8, 4, 4, 2, 1]
WEIGHTS = [120, 30, 55, 10, 77]


@pytest.mark.parametrize("route", ["auto", "gram", "svd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_florist_tau_one_reproduces_the_weighted_sum(route, dtype):
    factors = clients(RANKS, dtype=dtype)
    result = aggregate("florist", factors, WEIGHTS, tau=1.0, route=route)
    assert result.B.dtype == dtype and result.A.dtype == dtype
    assert rel_err(product(result), dense_sum(factors, WEIGHTS)) <= (1e-5 if dtype == torch.float32 else 1e-10)
    assert result.rank == sum(RANKS) and math.isclose(result.energy, 1.0)


def test_florist_spectrum_is_the_dense_spectrum():
    factors = clients(RANKS, decay=True)
    dense = dense_sum(factors, WEIGHTS)
    expected = torch.linalg.svdvals(dense)[: sum(RANKS)]
    got = aggregate("florist", factors, WEIGHTS).singular_values
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-10 * float(expected[0]))


@pytest.mark.parametrize("tau", [0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999])
def test_florist_rank_is_smallest_meeting_the_energy_rule_and_error_is_tail_energy(tau):
    factors = clients(RANKS, decay=True, seed=3)
    dense = dense_sum(factors, WEIGHTS)
    sigma = torch.linalg.svdvals(dense)
    energy = sigma.square()
    cumulative = torch.cumsum(energy, 0) / energy.sum()
    expected_rank = int((cumulative < tau).sum()) + 1  # smallest k with cumulative[k-1] >= tau
    result = aggregate("florist", factors, WEIGHTS, tau=tau)
    assert result.rank == expected_rank
    assert float(cumulative[result.rank - 1]) >= tau and (result.rank == 1 or float(cumulative[result.rank - 2]) < tau)
    # Eckart–Young: the truncation error is exactly the discarded energy.
    error = float((dense - product(result)).square().sum())
    assert math.isclose(error, float(energy[result.rank:].sum()), rel_tol=1e-6, abs_tol=1e-9 * float(energy.sum()))
    assert math.isclose(result.energy, float(cumulative[result.rank - 1]), rel_tol=1e-9)


def test_rank_is_monotone_in_tau_and_max_rank_caps():
    factors = clients(RANKS, decay=True, seed=5)
    ranks = [aggregate("florist", factors, WEIGHTS, tau=t).rank for t in (0.1, 0.5, 0.7, 0.9, 0.99, 1.0)]
    assert ranks == sorted(ranks) and ranks[0] >= 1
    assert aggregate("florist", factors, WEIGHTS, tau=1.0, max_rank=3).rank == 3


@pytest.mark.parametrize("seed", range(4))
def test_fast_route_equals_reference_route(seed):
    factors = clients([6, 6, 3, 2], m=50, n=70, seed=seed, decay=seed % 2 == 1)
    fast = aggregate("florist", factors, WEIGHTS[:4], tau=0.9, route="gram")
    reference = aggregate("florist", factors, WEIGHTS[:4], tau=0.9, route="svd")
    assert fast.rank == reference.rank
    assert rel_err(product(fast), product(reference)) < 1e-5
    assert torch.allclose(fast.singular_values, reference.singular_values, rtol=1e-6)


def test_fedit_is_the_padded_average():
    factors = clients([4, 2, 1])
    result = aggregate("fedit", factors, [1, 2, 1])
    p = [0.25, 0.5, 0.25]
    B = sum(pk * torch.nn.functional.pad(Bk, (0, 4 - Bk.shape[1])) for pk, (Bk, _) in zip(p, factors))
    A = sum(pk * torch.nn.functional.pad(Ak, (0, 0, 0, 4 - Ak.shape[0])) for pk, (_, Ak) in zip(p, factors))
    assert torch.allclose(result.B, B, atol=1e-6) and torch.allclose(result.A, A, atol=1e-6)
    assert result.padded and result.rank == 4
    assert not aggregate("fedit", clients([3, 3]), [1, 1]).padded


def test_flora_sends_the_exact_stack():
    factors = clients(RANKS)
    result = aggregate("flora", factors, WEIGHTS)
    assert result.rank == sum(RANKS) and result.B.shape == (40, sum(RANKS))
    assert rel_err(product(result), dense_sum(factors, WEIGHTS)) < 1e-6


def test_flexlora_truncates_the_dense_update_per_client():
    factors = clients([6, 3, 1], decay=True)
    weights = [3, 2, 5]
    dense = dense_sum(factors, weights)
    U, S, Vh = torch.linalg.svd(dense)
    result = aggregate("flexlora", factors, weights)
    assert result.rank == 6
    assert rel_err(product(result), (U[:, :6] * S[:6]) @ Vh[:6]) < 1e-5
    assert [B.shape[1] for B, _ in result.client_factors] == [6, 3, 1]  # each client its own rank
    for (B, A), r in zip(result.client_factors, (6, 3, 1)):
        assert A.shape[0] == r
        assert rel_err(B.double() @ A.double(), (U[:, :r] * S[:r]) @ Vh[:r]) < 1e-5


def test_ffa_averages_b_over_the_shared_frozen_a():
    g = torch.Generator().manual_seed(1)
    shared_A = torch.randn(4, 32, generator=g)
    factors = [(torch.randn(40, r, generator=g), shared_A[:r].clone()) for r in (4, 2, 4)]
    result = aggregate("ffa", factors, [1, 1, 2])
    assert torch.equal(result.A, shared_A) and result.rank == 4
    assert rel_err(product(result), dense_sum(factors, [1, 1, 2])) < 1e-6
    broken = [factors[0], (factors[1][0], torch.randn(2, 32, generator=g))]
    with pytest.raises(ValueError, match="shared frozen A"):
        aggregate("ffa", broken, [1, 1])


@pytest.mark.parametrize("method", METHODS)
def test_weights_are_normalised_sample_counts(method):
    factors = clients([3, 3, 3], decay=True)
    if method == "ffa":
        factors = [(B, factors[0][1]) for B, _ in factors]
    counts = [1, 2, 3]
    expected = dense_sum(factors, counts)  # Σ (n_k / Σ n) B_k A_k
    if method in ("fedit", "fedex", "hetlora"):  # the product of the averages: (Σ p_k B_k)(Σ p_k A_k)
        # (fedex's B @ A; its residual completes ΔW) with HetLoRA's p_k ∝ ‖B_k A_k‖_F, whatever the counts
        p = [c / 6 for c in counts]
        if method == "hetlora":
            norms = [float(torch.linalg.norm(B.double() @ A.double())) for B, A in factors]
            p = [w / sum(norms) for w in norms]
        B_mean = sum(pk * B.double() for pk, (B, _) in zip(p, factors))
        expected = B_mean @ sum(pk * A.double() for pk, (_, A) in zip(p, factors))
    if method == "flexlora":  # the weighted sum's SVD cut to the largest client rank, 3
        U, S, Vh = torch.linalg.svd(expected)
        expected = (U[:, :3] * S[:3]) @ Vh[:3]
    for weights in (counts, torch.tensor([7.0, 14.0, 21.0]), (0.5, 1.0, 1.5)):
        result = aggregate(method, factors, weights, tau=1.0)
        assert rel_err(product(result), expected) < 1e-5, (method, weights)


def test_all_zero_updates_give_rank_zero():
    factors = [(torch.zeros(40, r), torch.randn(r, 32)) for r in (4, 2)]
    result = aggregate("florist", factors, [1, 1])
    assert result.rank == 0 and result.B.shape == (40, 0) and result.A.shape == (0, 32)
    assert result.energy == 1.0


def test_some_zero_clients_and_rank_deficient_stacks():
    B, A = clients([3])[0]
    factors = [(B, A), (B.clone(), A.clone()), (torch.zeros(40, 2), torch.randn(2, 32))]
    result = aggregate("florist", factors, [1, 1, 1], tau=1.0)
    assert result.rank == 3  # two identical clients and a zero one: rank 3 in all
    assert rel_err(product(result), dense_sum(factors, [1, 1, 1])) < 1e-5


def test_stack_wider_than_the_matrix():
    factors = clients([8, 8, 4], m=8, n=8)  # R = 20 > min(m, n) = 8
    result = aggregate("florist", factors, [1, 2, 3], tau=1.0)
    assert result.rank == 8
    assert rel_err(product(result), dense_sum(factors, [1, 2, 3])) < 1e-5


def test_single_client_is_its_own_update():
    factors = clients([5])
    result = aggregate("florist", factors, [9], tau=1.0)
    assert result.rank == 5 and rel_err(product(result), dense_sum(factors, [1])) < 1e-5


def test_zero_weight_clients_are_ignored():
    factors = clients([3, 3])
    result = aggregate("florist", factors, [0, 5], tau=1.0)
    assert rel_err(product(result), factors[1][0].double() @ factors[1][1].double()) < 1e-5


def test_adapter_helper_matches_per_module_calls():
    adapter = {f"layer.{i}.q_proj": clients([4, 2, 2], seed=i, decay=True) for i in range(3)}
    adapter["other"] = clients([4, 2, 2], m=16, n=24, seed=9)
    batched = aggregate_adapter("florist", adapter, [3, 1, 2], tau=0.9)
    assert list(batched) == list(adapter)
    for name, factors in adapter.items():
        single = aggregate("florist", factors, [3, 1, 2], tau=0.9)
        assert batched[name].rank == single.rank
        assert rel_err(product(batched[name]), product(single)) < 1e-6
    fedit = aggregate_adapter("fedit", adapter, [3, 1, 2])
    assert all(r.method == "fedit" for r in fedit.values())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "fedavg"}, "unknown method"),
        ({"tau": 0.0}, "tau must be in"),
        ({"tau": 1.5}, "tau must be in"),
        ({"tau": float("nan")}, "tau must be in"),
        ({"max_rank": 0}, "max_rank"),
        ({"weights": [1, 2]}, "3 clients"),
        ({"weights": [1, -1, 1]}, "non-negative"),
        ({"weights": [0, 0, 0]}, "total weight is zero"),
        ({"weights": [1, float("inf"), 1]}, "finite"),
        ({"factors": []}, "no client factors"),
        ({"factors": "nan"}, "client 1: factors contain NaN"),
        ({"factors": "shape"}, "client 2: update is"),
        ({"factors": "rank"}, "client 0: B is"),
        ({"factors": "3d"}, "2-D"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(kwargs, match):
    factors = clients([2, 2, 2])
    if kwargs.get("factors") == "nan":
        factors[1][0][0, 0] = float("nan")
    elif kwargs.get("factors") == "shape":
        factors[2] = (torch.randn(41, 2), torch.randn(2, 32))
    elif kwargs.get("factors") == "rank":
        factors[0] = (torch.randn(40, 3), torch.randn(2, 32))
    elif kwargs.get("factors") == "3d":
        factors[0] = (torch.randn(1, 40, 2), torch.randn(2, 32))
    elif kwargs.get("factors") == []:
        factors = []
    call = {"method": "florist", "weights": [1, 1, 1], "tau": 0.9, "max_rank": None}
    call.update({k: v for k, v in kwargs.items() if k != "factors"})
    with pytest.raises(ValueError, match=match) as info:
        aggregate(call["method"], factors, call["weights"], tau=call["tau"], max_rank=call["max_rank"])
    assert "\n" not in str(info.value)


def test_select_rank_edge_cases():
    assert select_rank(torch.zeros(4), 0.9) == 0
    assert select_rank(torch.tensor([3.0, 0.0, 0.0]), 1.0) == 1
    assert select_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.5) == 2
    assert select_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 1.0, max_rank=2) == 2


@settings(max_examples=40, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    m=st.integers(1, 30),
    n=st.integers(1, 30),
    tau=st.floats(0.05, 1.0),
    seed=st.integers(0, 10_000),
)
def test_property_florist_matches_dense_truncation(ranks, m, n, tau, seed):
    factors = clients(ranks, m=m, n=n, seed=seed, dtype=torch.float64)
    weights = [1 + (seed + k) % 5 for k in range(len(ranks))]
    dense = dense_sum(factors, weights)
    sigma = torch.linalg.svdvals(dense)
    result = aggregate("florist", factors, weights, tau=tau)
    assert result.rank <= min(sum(ranks), m, n)
    # Error equals the tail energy of the dense spectrum beyond the chosen rank.
    error = float((dense - product(result)).square().sum())
    tail = float(sigma[result.rank :].square().sum())
    assert abs(error - tail) <= 1e-8 * float(sigma.square().sum()) + 1e-12
    assert result.energy >= tau - 1e-9


def test_zero_weight_client_with_a_huge_update_does_not_mask_the_others():
    factors = clients([4, 4, 4], seed=11)
    factors[2] = (factors[2][0] * 1e8, factors[2][1])  # excluded (weight 0) but enormous
    for route in ("gram", "svd"):
        result = aggregate("florist", factors, [1, 1, 0], tau=1.0, route=route)
        assert result.rank == 8
        assert rel_err(product(result), dense_sum(factors[:2], [1, 1])) < 1e-5


@pytest.mark.parametrize("scale", [1e-7, 1e-3, 1e4])
@pytest.mark.parametrize("route", ["gram", "svd"])
def test_result_does_not_depend_on_how_a_client_splits_its_update(scale, route):
    factors = clients([4, 3, 2], seed=12, decay=True)
    split = list(factors)
    split[1] = (factors[1][0] * scale, factors[1][1] / scale)  # same ΔW_1
    for tau in (1.0, 0.9):
        a = aggregate("florist", factors, WEIGHTS[:3], tau=tau, route=route)
        b = aggregate("florist", split, WEIGHTS[:3], tau=tau, route=route)
        assert a.rank == b.rank
        assert rel_err(product(b), product(a)) < 1e-5
        if tau == 1.0:
            assert rel_err(product(b), dense_sum(factors, WEIGHTS[:3])) < 1e-5


@pytest.mark.parametrize("route", ["gram", "svd"])
def test_ill_conditioned_stacks_stay_exact_and_optimal(route):
    """Column scales spread over 1e6 inside each client: cond(B_s) ~ 1e6, beyond the Cholesky limit."""
    g = torch.Generator().manual_seed(21)
    factors = []
    for r in (6, 4, 4):
        B = torch.randn(60, r, generator=g, dtype=torch.float64) * torch.logspace(0, -6, r, dtype=torch.float64)
        A = torch.randn(r, 50, generator=g, dtype=torch.float64)
        factors.append((B.float(), A.float()))
    dense = dense_sum(factors, [3, 1, 2])
    sigma = torch.linalg.svdvals(dense)
    exact = aggregate("florist", factors, [3, 1, 2], tau=1.0, route=route)
    assert rel_err(product(exact), dense) < 1e-5
    truncated = aggregate("florist", factors, [3, 1, 2], tau=0.99, route=route)
    error = float((dense - product(truncated)).square().sum())
    tail = float(sigma[truncated.rank :].square().sum())
    assert math.isclose(error, tail, rel_tol=1e-4, abs_tol=1e-10 * float(sigma.square().sum()))


def test_gram_overflow_falls_back_to_the_svd_route():
    factors = [(B * 1e160, A) for B, A in clients([3, 2], dtype=torch.float64, seed=4)]  # Grams overflow float64
    result = aggregate("florist", factors, [1, 1], tau=1.0)
    assert torch.isfinite(result.B).all() and torch.isfinite(result.A).all()
    scaled = [(B / 1e160, A) for B, A in factors]
    assert rel_err(product(result) / 1e160, dense_sum(scaled, [1, 1])) < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_every_method_handles_a_single_client_exactly(method):
    factors = clients([4], decay=True, seed=8)
    result = aggregate(method, factors, [5], tau=1.0)
    assert rel_err(product(result), dense_sum(factors, [1])) < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_every_method_handles_all_zero_updates(method):
    shared_A = torch.randn(3, 32)
    factors = [(torch.zeros(40, 3), shared_A.clone()), (torch.zeros(40, 3), shared_A.clone())]
    result = aggregate(method, factors, [1, 2], tau=0.9)
    assert torch.isfinite(result.B).all() and torch.isfinite(result.A).all()
    assert float(product(result).abs().max()) == 0.0


@pytest.mark.parametrize("method", ["fedit", "flora", "flexlora"])
def test_stack_wider_than_the_matrix_for_baselines(method):
    factors = clients([8, 8, 4], m=8, n=8, seed=2)
    result = aggregate(method, factors, [1, 2, 3], tau=1.0)
    if method == "flora":
        assert rel_err(product(result), dense_sum(factors, [1, 2, 3])) < 1e-5
    elif method == "flexlora":  # rank min(8, max r_k) = 8 = full: exact
        assert result.rank == 8 and rel_err(product(result), dense_sum(factors, [1, 2, 3])) < 1e-5
    else:
        assert result.B.shape == (8, 8) and result.padded


@pytest.mark.parametrize(
    "change, match",
    [
        ("inf", "client 0: factors contain NaN or Inf"),
        ("a_columns", "client 1: update is 40×33"),
        ("nan_weight", "finite"),
        ("negative_tau", "tau must be in"),
        ("tau_text", "tau must be in"),
        ("max_rank_float", "max_rank must be a positive integer"),
        ("weights_text", "weights must be a sequence of numbers"),
    ],
)
@pytest.mark.parametrize("method", METHODS)
def test_more_bad_arguments_for_every_method(method, change, match):
    factors = clients([2, 2])
    kwargs = {"tau": 0.9}
    weights = [1, 1]
    if change == "inf":
        factors[0][1][0, 0] = float("inf")
    elif change == "a_columns":
        factors[1] = (factors[1][0], torch.randn(2, 33))
    elif change == "nan_weight":
        weights = [1, float("nan")]
    elif change == "negative_tau":
        kwargs["tau"] = -0.5
    elif change == "tau_text":
        kwargs["tau"] = "0.9"
    elif change == "max_rank_float":
        kwargs["max_rank"] = 1.5
    elif change == "weights_text":
        weights = "ab"
    with pytest.raises(ValueError, match=match) as info:
        aggregate(method, factors, weights, **kwargs)
    assert "\n" not in str(info.value)


def test_numpy_scalars_are_valid_options():
    import numpy as np

    factors = clients([3, 2], decay=True)
    a = aggregate("florist", factors, np.array([2, 1]), tau=np.float32(0.9), max_rank=np.int64(4))
    b = aggregate("florist", factors, [2, 1], tau=0.9, max_rank=4)
    assert a.rank == b.rank and torch.equal(a.B, b.B)


def test_adapter_helper_names_the_module_in_errors():
    adapter = {"good": clients([2, 2]), "bad.v_proj": clients([2, 2])}
    adapter["bad.v_proj"][1][0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="module bad.v_proj: client 1: factors contain NaN"):
        aggregate_adapter("florist", adapter, [1, 1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_gpu_inputs_stay_on_the_gpu_and_match_the_cpu(method):
    factors = clients([4, 2, 2], decay=True, seed=13)
    if method == "ffa":
        factors = [(B, factors[0][1][: B.shape[1]]) for B, _ in factors]
    on_gpu = [(B.cuda(), A.cuda()) for B, A in factors]
    gpu = aggregate(method, on_gpu, [3, 1, 2], tau=0.9)
    cpu = aggregate(method, factors, [3, 1, 2], tau=0.9)
    assert gpu.B.is_cuda and gpu.A.is_cuda and gpu.B.dtype == torch.float32
    assert gpu.rank == cpu.rank
    assert rel_err(product(gpu).cpu(), product(cpu)) < 1e-5


# ------------------------------------------------ gram vs dense route at the crossover


def crossover_cases():
    """(factors, weights) around R = min(m, n) = 32: below, at, above, rank-deficient, zero weights."""
    cases = {}
    for label, ranks in (("below", [8, 8, 8]), ("at", [8, 8, 8, 8]), ("above", [8] * 6)):
        factors = clients(ranks, m=48, n=32, seed=len(ranks), decay=True)
        cases[label] = (factors, [3 + k for k in range(len(ranks))])
    wide = clients([8] * 6, m=32, n=48, seed=7, decay=True)  # m < n: the other Gram side
    cases["above_wide"] = (wide, [1, 2, 3, 4, 5, 6])
    B, A = clients([6], m=48, n=32, seed=9)[0]
    deficient = [(B, A), (2 * B, A), (B[:, :4], A[:4]), *clients([6, 6, 6, 6], m=48, n=32, seed=10)]
    deficient[3] = (
        deficient[0][0] @ torch.randn(6, 6, dtype=B.dtype, generator=torch.Generator().manual_seed(1)),
        deficient[3][1],
    )  # same column space as client 0
    cases["rank_deficient"] = (deficient, [1, 1, 2, 1, 1, 1, 3])
    zero = clients([8] * 6, m=48, n=32, seed=11, decay=True)
    zero[1] = (zero[1][0] * 1e6, zero[1][1])  # huge but weight 0
    zero[4] = (torch.zeros_like(zero[4][0]), zero[4][1])  # no update at all
    cases["zero_weight"] = (zero, [2, 0, 3, 0, 1, 5])
    return cases


@pytest.mark.parametrize("case", ["below", "at", "above", "above_wide", "rank_deficient", "zero_weight"])
@pytest.mark.parametrize("tau", [0.5, 0.9, 0.99, 1.0])
def test_gram_and_dense_routes_agree_with_the_dense_svd(case, tau):
    factors, weights = crossover_cases()[case]
    dense = dense_sum(factors, weights)
    U, S, Vh = torch.linalg.svd(dense)  # the independent reference: float64 SVD of ΔW
    energy = S.square()
    cumulative = torch.cumsum(energy, 0) / energy.sum()
    expected_rank = min(int((cumulative < tau * (1 - 1e-12)).sum()) + 1, int((S > 1e-9 * S[0]).sum()))
    reference = (U[:, :expected_rank] * S[:expected_rank]) @ Vh[:expected_rank]
    for route in ("gram", "dense", "auto"):
        result = aggregate("florist", factors, weights, tau=tau, route=route)
        assert result.rank == expected_rank, (route, case, tau)
        assert rel_err(product(result), reference) < 1e-5, (route, case, tau)
        top = result.singular_values[:expected_rank]
        assert torch.allclose(top, S[:expected_rank], rtol=1e-5), (route, case)
        assert math.isclose(result.energy, float(cumulative[expected_rank - 1]), rel_tol=1e-6)
        # same B = UΣ, A = Vᵀ split: A has orthonormal rows
        A = result.A.double()
        assert torch.allclose(A @ A.T, torch.eye(result.rank, dtype=torch.float64), atol=1e-5)


def test_auto_route_switches_to_dense_only_where_it_is_cheaper():
    from florist_mpi.aggregation import exact_route, route_costs

    assert exact_route(4096, 4096, 512) == "gram"
    assert exact_route(4096, 4096, 5120) == "dense"  # R > min(m, n): no Cholesky factor exists
    assert exact_route(4096, 4096, 4096) == "dense"
    assert exact_route(4096, 4096, 3584) == "dense"  # measured: Gram route 283 s, dense 59 s
    assert exact_route(4096, 4096, 3072) == "gram"  # measured: Gram route 50 s, dense 73 s
    routes = [exact_route(4096, 4096, R) for R in range(256, 8192, 256)]
    switch = routes.index("dense")
    assert set(routes[:switch]) == {"gram"} and set(routes[switch:]) == {"dense"}  # one crossover
    costs = route_costs(4096, 11008, 2048)
    assert costs["gram"] < costs["dense"] and exact_route(4096, 11008, 2048) == "gram"


@pytest.mark.parametrize("method", ["flora", "fedit", "ffa", "flexlora"])
def test_baselines_above_the_crossover_match_the_dense_reference(method):
    factors = clients([8] * 6, m=48, n=32, seed=14, decay=True)  # R = 48 > 32
    if method == "ffa":
        factors = [(B, factors[0][1]) for B, _ in factors]
    weights = [1, 2, 3, 1, 2, 3]
    result = aggregate(method, factors, weights, tau=0.9)
    if method in ("flora", "flexlora", "ffa"):
        dense = dense_sum(factors, weights)
    else:
        p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        dense = sum(pk * B.double() for pk, (B, _) in zip(p, factors)) @ sum(
            pk * A.double() for pk, (_, A) in zip(p, factors)
        )
    S = torch.linalg.svdvals(dense)
    if method == "flexlora":
        U, S, Vh = torch.linalg.svd(dense)
        dense = (U[:, :8] * S[:8]) @ Vh[:8]
    assert rel_err(product(result), dense) < 1e-5
    count = min(len(result.singular_values), len(S))
    assert torch.allclose(result.singular_values[:count], S[:count], rtol=1e-5, atol=1e-7 * float(S[0]))
    assert float(result.singular_values.square().sum()) == pytest.approx(float(S.square().sum()), rel=1e-6)
