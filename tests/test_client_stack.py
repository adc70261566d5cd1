"""The stacked input form (ClientStack), the method contract, the Gram route's fallback and the one
cost model, checked against independent computations (per-client loops, dense float64 sums)."""
from __future__ import annotations

import math

import pytest
import torch

from florist_mpi import costmodel, lowrank, methods, simclock
from florist_mpi.aggregation import ClientStack, aggregate, aggregate_adapter, aggregation_cost, route_costs
from florist_mpi.sharding import module_costs

METHODS = methods.names()


def clients(ranks, m=40, n=32, seed=0, dtype=torch.float32, shared_A=False):
    """Random (B_k, A_k) with decaying column scales; with shared_A every A_k is a prefix of one A (FFA)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(max(ranks), n, generator=g, dtype=torch.float64)
    out = []
    for r in ranks:
        B = torch.randn(m, r, generator=g, dtype=torch.float64) * torch.logspace(0, -2, r, dtype=torch.float64)
        A = common[:r].clone() if shared_A else torch.randn(r, n, generator=g, dtype=torch.float64)
        out.append((B.to(dtype), A.to(dtype)))
    return out


def stack_of(pairs, transposed=False) -> ClientStack:
    """The stack of `pairs`; transposed: B as the transpose of a contiguous R×m buffer (the exchange's layout)."""
    ranks = [B.shape[1] for B, _ in pairs]
    A = torch.cat([A for _, A in pairs], 0)
    if transposed:
        return ClientStack(torch.cat([B.T for B, _ in pairs], 0).contiguous().T, A, ranks)
    return ClientStack(torch.cat([B for B, _ in pairs], 1), A, ranks)


def dense_sum(pairs, weights):
    total = math.fsum(float(w) for w in weights)
    return sum((float(w) / total) * B.double() @ A.double() for w, (B, A) in zip(weights, pairs))


def product(result):
    return result.B.double() @ result.A.double()


def rel_err(X, Y):
    return float((X - Y).norm() / max(float(Y.norm()), 1e-300))


CASES = {  # ranks, weights, m, n: the Gram route, zero weights, R > min(m, n) (the dense route)
    "heterogeneous": ([6, 1, 4, 2, 3], [5, 1, 7, 2, 4], 40, 32),
    "zero_weight": ([4, 2, 4, 3, 1], [3, 0, 2, 0, 6], 40, 32),
    "wide": ([8, 2, 8, 6, 8, 4, 8], [1, 2, 3, 4, 5, 6, 7], 24, 36),
}


# ------------------------------------------------------------------ stacked form = list form


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", METHODS)
def test_stack_and_pairs_give_identical_results(method, case):
    ranks, weights, m, n = CASES[case]
    pairs = clients(ranks, m, n, seed=len(case), shared_A=method == "ffa")
    from_pairs = aggregate(method, pairs, weights, tau=0.9)
    from_stack = aggregate(method, stack_of(pairs), weights, tau=0.9)
    assert from_stack.rank == from_pairs.rank and from_stack.padded == from_pairs.padded
    for field in ("B", "A", "singular_values"):  # bitwise: the same stack in another dtype, the same kernels
        assert torch.equal(getattr(from_stack, field), getattr(from_pairs, field)), (method, case, field)
    assert from_stack.energy == from_pairs.energy
    if method == "flexlora":
        assert from_stack.client_ranks.tolist() == [min(r, from_pairs.rank) for r in ranks]
        assert torch.equal(from_stack.client_ranks, from_pairs.client_ranks)
    # the exchange's layout (B a transposed view): the same result up to the order of float64 sums
    transposed = aggregate(method, stack_of(pairs, transposed=True), weights, tau=0.9)
    assert transposed.rank == from_pairs.rank
    assert rel_err(product(transposed), product(from_pairs)) < 1e-6
    top = float(from_pairs.singular_values.max()) if from_pairs.singular_values.numel() else 0.0
    # singular values below ~1e-8 σ_1 are the Gram route's float64 noise floor
    assert torch.allclose(transposed.singular_values, from_pairs.singular_values, rtol=1e-6, atol=1e-7 * top)


@pytest.mark.parametrize("method", METHODS)
def test_aggregate_adapter_takes_stacks_and_pairs_side_by_side(method):
    ranks, weights = [3, 1, 2], [2, 5, 3]
    adapter = {
        "q": clients(ranks, 16, 12, seed=1, shared_A=method == "ffa"),
        "up": clients(ranks, 24, 12, seed=2, shared_A=method == "ffa"),
    }
    mixed = {"q": adapter["q"], "up": stack_of(adapter["up"], transposed=True)}
    results = aggregate_adapter(method, mixed, weights, tau=0.9)
    for name, pairs in adapter.items():
        single = aggregate(method, pairs, weights, tau=0.9)
        assert results[name].rank == single.rank and rel_err(product(results[name]), product(single)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", METHODS)
def test_the_callers_buffers_are_never_written_nor_returned(method, dtype):
    pairs = clients([4, 2, 3], seed=3, dtype=dtype, shared_A=method == "ffa")
    stack = stack_of(pairs, transposed=True)
    before_B, before_A = stack.B.clone(), stack.A.clone()
    for route in ("auto", "gram", "dense", "svd"):
        result = aggregate(method, stack, [1, 0, 2], tau=0.9, route=route)
        assert torch.equal(stack.B, before_B) and torch.equal(stack.A, before_A)
        buffers = {stack.B.untyped_storage().data_ptr(), stack.A.untyped_storage().data_ptr()}
        assert result.B.untyped_storage().data_ptr() not in buffers
        assert result.A.untyped_storage().data_ptr() not in buffers


def test_many_tiny_clients_match_per_client_loops():
    """2,000 clients of ranks 1–4 (zero weights among them): every per-client operation is vectorised,
    so check each method against a plain loop over the clients."""
    K, m, n = 2000, 24, 16
    g = torch.Generator().manual_seed(7)
    ranks = [1 + (7 * k) % 4 for k in range(K)]
    weights = [0 if k % 97 == 0 else 1 + (13 * k) % 50 for k in range(K)]
    pairs = clients(ranks, m, n, seed=8)
    stack = stack_of(pairs, transposed=True)
    total = math.fsum(weights)
    p = [w / total for w in weights]
    dense = dense_sum(pairs, weights)

    florist = aggregate("florist", stack, weights, tau=1.0)  # R ≫ min(m, n): the dense route
    assert florist.rank == min(m, n) and rel_err(product(florist), dense) < 1e-6

    fedit = aggregate("fedit", stack, weights)
    B_mean = torch.zeros(m, 4, dtype=torch.float64)
    A_mean = torch.zeros(4, n, dtype=torch.float64)
    for pk, (B, A) in zip(p, pairs):  # the independent loop: zero-padded weighted averages
        B_mean[:, : B.shape[1]] += pk * B.double()
        A_mean[: A.shape[0]] += pk * A.double()
    assert fedit.padded and torch.allclose(fedit.B.double(), B_mean, rtol=1e-5, atol=1e-7)
    assert torch.allclose(fedit.A.double(), A_mean, rtol=1e-5, atol=1e-7)

    flora = aggregate("flora", stack, weights)
    assert flora.rank == sum(ranks) and rel_err(product(flora), dense) < 1e-6

    flexlora = aggregate("flexlora", stack, weights)
    assert flexlora.client_ranks.tolist() == ranks  # every rank ≤ 4 = the global rank
    assert [B.shape[1] for B, _ in flexlora.client_factors] == ranks

    shared = torch.randn(4, n, generator=g)
    frozen = [(B, shared[: B.shape[1]].clone()) for B, _ in pairs]
    ffa = aggregate("ffa", stack_of(frozen, transposed=True), weights)
    B_avg = torch.zeros(m, 4, dtype=torch.float64)
    for pk, (B, _) in zip(p, frozen):
        B_avg[:, : B.shape[1]] += pk * B.double()
    assert torch.allclose(ffa.B.double(), B_avg, rtol=1e-5, atol=1e-7) and torch.equal(ffa.A, shared)


# ------------------------------------------------------------------ checks of the stacked form


@pytest.mark.parametrize("route", ["auto", "gram", "dense", "svd"])
@pytest.mark.parametrize("method", METHODS)
def test_nan_names_the_right_client_of_a_stack(method, route):
    pairs = clients([3, 1, 4, 2, 2], seed=9)
    stack = stack_of(pairs, transposed=True)
    buffer = stack.B.T  # the contiguous R×m buffer; client 3 owns its rows 8 and 9
    buffer[9, 5] = float("nan")
    with pytest.raises(ValueError, match="client 3: factors contain NaN or Inf") as info:
        aggregate(method, stack, [1, 1, 1, 1, 1], tau=0.9, route=route)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "change, match",
    [
        ("ranks_sum", r"ranks sum to 8 but B is \(40, 9\)"),
        ("negative", "ranks must be non-negative"),
        ("one_d", "must be 2-D"),
        ("dtypes", "one floating dtype"),
        ("weights", "got 2 weights for 3 clients"),
        ("empty", "no client factors"),
    ],
)
def test_bad_stacks_raise_one_line_errors(change, match):
    pairs = clients([4, 2, 3])
    stack, weights = stack_of(pairs), [1, 2, 3]
    if change == "ranks_sum":
        stack = ClientStack(stack.B, stack.A, [4, 2, 2])
    elif change == "negative":
        stack = ClientStack(stack.B, stack.A, [5, -1, 5])
    elif change == "one_d":
        stack = ClientStack(stack.B[0], stack.A, [4, 2, 3])
    elif change == "dtypes":
        stack = ClientStack(stack.B.double(), stack.A, [4, 2, 3])
    elif change == "weights":
        weights = [1, 2]
    elif change == "empty":
        stack = ClientStack(stack.B[:, :0], stack.A[:0], [])
    with pytest.raises(ValueError, match=match) as info:
        aggregate("florist", stack, weights, tau=0.9)
    assert "\n" not in str(info.value)


def test_ffa_names_the_client_whose_A_is_not_the_shared_prefix():
    pairs = clients([4, 2, 4, 3], seed=10, shared_A=True)
    pairs[3] = (pairs[3][0], pairs[3][1] + 1e-3)
    with pytest.raises(ValueError, match="client 3's A is not the first 3 rows of the shared frozen A"):
        aggregate("ffa", stack_of(pairs, transposed=True), [1, 1, 1, 1])
    pairs[3] = (pairs[3][0], pairs[3][1] - 1e-3 + 1e-9)  # within float32 tolerance: accepted
    assert aggregate("ffa", stack_of(pairs), [1, 1, 1, 1]).rank == 4


# ------------------------------------------------------------------ the method contract


class _BrokenRank(methods.Method):
    """A method from outside whose result claims one rank more than its factors have."""

    name = "broken_rank"

    def aggregate(self, stack, p, *, tau, max_rank, route, out_dtype):
        B = lowrank.dense_update(stack, p)[:, :3]
        A = torch.eye(3, stack.shape[1], dtype=torch.float64)
        return lowrank.AggregationResult(B.to(out_dtype), A.to(out_dtype), 4, torch.ones(3), 1.0, method=self.name)

    def plan(self, m, n, K, R, r_max, r_g):
        return costmodel.RoutePlan("dense", 2.0 * m * n * R)


class _WrongType(_BrokenRank):
    name = "wrong_type"

    def aggregate(self, stack, p, *, tau, max_rank, route, out_dtype):
        return stack.B, stack.A


class _WrongDtype(_BrokenRank):
    name = "wrong_dtype"

    def aggregate(self, stack, p, *, tau, max_rank, route, out_dtype):
        B = lowrank.dense_update(stack, p)
        return lowrank.AggregationResult(B, torch.eye(stack.shape[1], dtype=torch.float64), B.shape[1],
                                         torch.ones(1), 1.0)


@pytest.mark.parametrize(
    "method, match",
    [
        (_BrokenRank(), r"method 'broken_rank' broke the aggregation contract: rank 4 but B is \(40, 3\)"),
        (_WrongType(), "method 'wrong_type' broke the aggregation contract: returned tuple, not an AggregationResult"),
        (_WrongDtype(), "method 'wrong_dtype' broke the aggregation contract: B and A must be torch.float32"),
    ],
)
def test_a_result_that_breaks_the_contract_is_refused_with_the_method_named(method, match):
    methods.register(method)
    try:
        pairs = clients([3, 2])
        with pytest.raises(ValueError, match=match) as info:
            aggregate(method.name, pairs, [1, 1])
        assert "\n" not in str(info.value) and "methods/base.py" in str(info.value)
        with pytest.raises(ValueError, match="module q: " + match):
            aggregate_adapter(method.name, {"q": stack_of(pairs)}, [1, 1])
    finally:
        methods.unregister(method.name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", METHODS)
def test_every_builtin_result_keeps_the_contract(method, dtype):
    for ranks, weights, m, n in CASES.values():
        pairs = clients(ranks, m, n, dtype=dtype, shared_A=method == "ffa")
        for route in ("auto", "gram", "dense", "svd"):
            result = aggregate(method, stack_of(pairs, transposed=True), weights, tau=0.9, route=route)
            assert result.rank == result.B.shape[1] == result.A.shape[0]  # what sharded mode slices by
            assert methods.base.contract_breach(result, stack_of(pairs), dtype) is None
            assert result.B.is_contiguous() and result.A.is_contiguous()  # export and storage take them as is


# ------------------------------------------------------------------ Gram route: fallback without a Cholesky factor


def ill_conditioned(ranks, m, n, seed):
    """Column scales spread over 1e6 inside each client: cond(B_s) ~ 1e6, beyond CHOLESKY_MAX_COND."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in ranks:
        B = torch.randn(m, r, generator=g, dtype=torch.float64) * torch.logspace(0, -6, r, dtype=torch.float64)
        out.append((B.float(), torch.randn(r, n, generator=g, dtype=torch.float64).float()))
    return out


def test_near_the_fill_limit_a_failed_cholesky_falls_back_to_the_dense_route(monkeypatch):
    m = n = 40
    pairs, weights = ill_conditioned([10, 10, 10], m, n, seed=11), [3, 1, 2]  # R = 30 = 0.75 · 40, below 0.8
    R = 30
    assert R < costmodel.GRAM_MAX_FILL * min(m, n) and costmodel.exact_route(m, n, R) == "gram"
    assert costmodel.gram_fallback(m, n, R) == "dense"  # by the cost model: dense < the m×R SVD basis
    calls = []
    dense_route = lowrank._florist_dense
    monkeypatch.setattr(lowrank, "_florist_dense", lambda *a: calls.append(1) or dense_route(*a))
    dense = dense_sum(pairs, weights)
    sigma = torch.linalg.svdvals(dense)
    for tau in (1.0, 0.99):
        calls.clear()
        gram = aggregate("florist", pairs, weights, tau=tau, route="gram")
        assert calls == [1]  # the Cholesky factor failed and the dense route ran, once
        forced = aggregate("florist", pairs, weights, tau=tau, route="dense")
        assert gram.rank == forced.rank and torch.equal(gram.B, forced.B) and torch.equal(gram.A, forced.A)
        assert torch.equal(gram.singular_values, forced.singular_values)
        error = float((dense - product(gram)).square().sum())  # Eckart–Young, against the float64 SVD
        assert math.isclose(error, float(sigma[gram.rank :].square().sum()), rel_tol=1e-4,
                            abs_tol=1e-10 * float(sigma.square().sum()))


def test_far_below_the_fill_limit_a_failed_cholesky_takes_the_svd_basis(monkeypatch):
    m, n = 60, 50
    pairs, weights = ill_conditioned([6, 4, 4], m, n, seed=12), [3, 1, 2]  # R = 14 ≪ 50
    assert costmodel.gram_fallback(m, n, 14) == "svd_basis"
    monkeypatch.setattr(lowrank, "_florist_dense", lambda *a: pytest.fail("the dense route ran"))
    result = aggregate("florist", pairs, weights, tau=1.0, route="gram")
    assert rel_err(product(result), dense_sum(pairs, weights)) < 1e-5


def test_fallback_choice_follows_the_cost_model_across_the_fill():
    fills = [costmodel.gram_fallback(4096, 4096, R) for R in range(128, 3300, 128)]
    switch = fills.index("dense")
    assert set(fills[:switch]) == {"svd_basis"} and set(fills[switch:]) == {"dense"}  # one crossover
    assert 0.3 < (128 + 128 * switch) / 4096 < 0.7  # about half-way to the fill limit on square modules


# ------------------------------------------------------------------ one cost model


def test_clock_charges_florist_the_route_aggregate_takes():
    """The issue's example: 4096², K = 1024 rank-16 clients (R = 16384), r_g = 743."""
    m = n = 4096
    R, r_g = 16384, 743
    flops = methods.get("florist").server_flops(m, n, 1024, R, 16, r_g)
    dense = 2.0 * m * n * R + 1.25 * m * n * n + 13.0 * n**3  # ΔW, its Gram (4 strips of the triangle), eigh
    assert costmodel.exact_route(m, n, R) == "dense"
    assert flops == pytest.approx(dense + 2.0 * m * n * r_g, rel=1e-12)  # + ΔW projected on r_g vectors
    cheaper = min(route_costs(m, n, R).values()) + costmodel.final_products_flops("dense", m, n, R, r_g)
    assert flops <= 1.1 * cheaper
    old_gram_formula = 2.0 * (m + n) * R**2 + 14.0 * R**3 + 2.0 * (m + n) * R * r_g
    assert old_gram_formula / flops > 30  # what the clock charged before: 37× too much
    assert simclock.aggregation_flops("florist", {"q": (m, n)}, [16] * 1024, {"q": r_g}) == pytest.approx(flops)


@pytest.mark.parametrize("R", [24, 40, 64])
def test_auto_route_is_the_plan_route(R):
    m, n = 48, 32
    pairs = clients([8] * (R // 8), m, n, seed=R)
    weights = list(range(1, R // 8 + 1))
    plan = costmodel.florist_plan(m, n, R, 0)
    auto = aggregate("florist", pairs, weights, tau=0.9)
    forced = aggregate("florist", pairs, weights, tau=0.9, route=plan.route)
    assert torch.equal(auto.B, forced.B) and torch.equal(auto.A, forced.A)
    assert plan.route == ("gram" if R < 0.8 * 32 else "dense")


@pytest.mark.parametrize("method", METHODS)
def test_owner_balancing_and_clock_read_the_same_plan(method):
    shapes = {"q": (4096, 4096), "up": (11008, 4096), "tiny": (64, 64)}
    ranks = [16] * 40 + [8] * 20
    K, R, r_max = len(ranks), sum(ranks), max(ranks)
    costs = module_costs(method, shapes, ranks)
    for name, (m, n) in shapes.items():
        plan = methods.get(method).plan(m, n, K, R, r_max, min(R, m, n))
        assert costs[name] == aggregation_cost(method, m, n, K, R, r_max) == plan.flops + plan.spectrum_flops
        clock = simclock.aggregation_flops(method, {name: (m, n)}, ranks, {name: 7})
        assert clock == methods.get(method).plan(m, n, K, R, r_max, 7).flops


def test_symmetric_gram_is_the_gram():
    g = torch.Generator().manual_seed(13)
    for rows, width in ((50, 7), (300, 2 * costmodel.GRAM_STRIP + 5), (90, 5 * costmodel.GRAM_STRIP + 3)):
        X = torch.randn(rows, width, generator=g, dtype=torch.float64)
        G = lowrank.symmetric_gram(X)
        assert torch.allclose(G, X.T @ X, rtol=1e-13, atol=1e-12)
        assert costmodel.gram_strips(width) == 1 or torch.equal(G, G.T)  # strips: one triangle, mirrored
