"""Aggregation by method name: the public, pure-math entry points.

`aggregate(method, factors, n_k, tau=...)` aggregates one module's client factors,
`aggregate_adapter` every module of an adapter. The factors come in either form:
  * a list of (B_k, A_k) pairs, B_k m×r_k and A_k r_k×n (stacked with one concatenation per factor);
  * a `ClientStack(B, A, ranks)`: B (m×R, any strides, e.g. the transpose of a contiguous R×m
    exchange buffer), A (R×n), ranks r_k (K,), client k at columns offset_k … offset_k + r_k - 1
    in client order. Nothing is copied for it and the buffers are never written.
The weights are the sample counts n_k, one per client in the same order; p_k = n_k / Σ n is
formed and applied here. No MPI, no DeepSpeed, no I/O: any framework can call them. The method
(a name from florist_mpi.methods, or a Method object) supplies the math, which lives in
florist_mpi.lowrank (see its docstring for FLoRIST's routes and their accuracy).
"""

from __future__ import annotations

from florist_mpi import methods
from florist_mpi.lowrank import (  # noqa: F401 - re-exported: the public names of the math
    ROUTES,
    AggregationResult,
    ClientStack,
    Factors,
    RoutePlan,
    check_finite,
    check_options,
    exact_route,
    normalised_weights,
    route_costs,
    select_rank,
    spectrum_of,
    stack_factors,
    weight_vector,
)


def aggregate(
    method: str | methods.Method,
    factors: Factors | ClientStack,
    weights,
    *,
    tau: float = 1.0,
    max_rank: int | None = None,
    route: str = "auto",
) -> AggregationResult:
    """Aggregate one adapted module's client factors into global factors.

    Every client k supplies its effective update ΔW_k = B_k @ A_k (LoRA scaling already
    folded into B_k), as (B_k, A_k) pairs or one ClientStack (module docstring); `weights`
    are sample counts n_k. `tau` and `max_rank` shape FLoRIST only; the other methods accept
    and ignore them. `route` picks FLoRIST's numerics: "auto" (the cheaper of "gram" and
    "dense" for the module's m, n and R, see `exact_route`), one of those two forced, or
    the reference "svd". Results are returned in the inputs' dtype on the inputs'
    device; the work is float64.
    """
    method = methods.get(method)
    check_options(tau, max_rank, route)
    stack = stack_factors(factors)
    p = weight_vector(weights, stack.count, stack.B.device)
    return _aggregate_module(method, stack, p, tau, max_rank, route)


def _aggregate_module(method: methods.Method, stack: ClientStack, p, tau, max_rank, route: str):
    if method.checks_finite(route):
        check_finite(stack)
    result = method.aggregate(stack, p, tau=tau, max_rank=max_rank, route=route, out_dtype=stack.B.dtype)
    methods.check_result(method, result, stack)
    return result


def aggregate_adapter(
    method: str | methods.Method,
    adapter_factors: dict[str, Factors | ClientStack],
    weights,
    *,
    tau: float = 1.0,
    max_rank: int | None = None,
    route: str = "auto",
) -> dict[str, AggregationResult]:
    """Aggregate every module of an adapter (module name -> its clients' factors, either form) in one call.

    The clients and their order are the same in every module. The modules run one after
    another: batching all equal-shaped modules into batched products and batched R×R
    eigensolvers measured 1.9× slower on CPU (torch 2.13, MKL; `benchmarks/aggregation.py
    --batched`), since each module's Grams already run at full GEMM speed and batching only
    adds memory traffic.
    """
    method = methods.get(method)
    check_options(tau, max_rank, route)
    results, p = {}, None
    for name, factors in adapter_factors.items():
        try:
            stack = stack_factors(factors)
            if p is None or p.numel() != stack.count or p.device != stack.B.device:
                p = weight_vector(weights, stack.count, stack.B.device)
            results[name] = _aggregate_module(method, stack, p, tau, max_rank, route)
        except ValueError as err:
            raise ValueError(f"module {name}: {err}") from None
    return results


def aggregation_cost(method: str | methods.Method, m: int, n: int, K: int, R: int, r_max: int) -> float:
    """Estimated FLOPs of aggregating one m×n module, for spreading modules over workers
    (Method.aggregation_cost: K clients, R = Σ r_k, r_max = max r_k; r_g is not known yet)."""
    return methods.get(method).aggregation_cost(m, n, K, R, r_max)
