"""Aggregation by method name: the public, pure-math entry points.

`aggregate(method, [(B_k, A_k), ...], n_k, tau=...)` aggregates one module's client
factors, `aggregate_adapter` every module of an adapter. No MPI, no DeepSpeed, no I/O:
any framework can call them. The method (a name from florist_mpi.methods, or a Method
object) supplies the math, which lives in florist_mpi.lowrank (see its docstring for
FLoRIST's routes and their accuracy).
"""

from __future__ import annotations

from florist_mpi import methods
from florist_mpi.lowrank import (  # noqa: F401 - re-exported: the public names of the math
    ROUTES,
    AggregationResult,
    Factors,
    check_factors,
    check_options,
    exact_route,
    normalised_weights,
    route_costs,
    select_rank,
    spectrum_of,
)


def aggregate(
    method: str | methods.Method,
    factors: Factors,
    weights,
    *,
    tau: float = 1.0,
    max_rank: int | None = None,
    route: str = "auto",
) -> AggregationResult:
    """Aggregate one adapted module's client factors into global factors.

    Every client k supplies its effective update ΔW_k = B_k @ A_k (LoRA scaling already
    folded into B_k), B_k of shape m×r_k and A_k of shape r_k×n; `weights` are sample
    counts n_k. `tau` and `max_rank` shape FLoRIST only; the other methods accept and
    ignore them. `route` picks FLoRIST's numerics: "auto" (the cheaper of "gram" and
    "dense" for the module's m, n and R, see `exact_route`), one of those two forced, or
    the reference "svd". Results are returned in the inputs' dtype on the inputs'
    device; the work is float64.
    """
    return _aggregate_module(methods.get(method), factors, weights, tau, max_rank, route)


def _aggregate_module(method: methods.Method, factors: Factors, weights, tau, max_rank, route: str):
    check_options(tau, max_rank, route)
    check_factors(factors, finite=method.checks_finite(route))
    p = normalised_weights(weights, len(factors))
    return method.aggregate(factors, p, tau=tau, max_rank=max_rank, route=route, out_dtype=factors[0][0].dtype)


def aggregate_adapter(
    method: str | methods.Method,
    adapter_factors: dict[str, Factors],
    weights,
    *,
    tau: float = 1.0,
    max_rank: int | None = None,
    route: str = "auto",
) -> dict[str, AggregationResult]:
    """Aggregate every module of an adapter (module name -> per-client (B, A) list) in one call.

    The modules run one after another: batching all equal-shaped modules into batched
    products and batched R×R eigensolvers measured 1.9× slower on CPU (torch 2.13, MKL;
    `benchmarks/aggregation.py --batched`), since each module's Grams already run at
    full GEMM speed and batching only adds memory traffic.
    """
    method = methods.get(method)
    results = {}
    for name, factors in adapter_factors.items():
        try:
            results[name] = _aggregate_module(method, factors, weights, tau, max_rank, route)
        except ValueError as err:
            raise ValueError(f"module {name}: {err}") from None
    return results


def aggregation_cost(method: str | methods.Method, m: int, n: int, R: int, width: int) -> float:
    """Estimated work of aggregating one module (for spreading modules over workers).

    R is the stack width Σ r_k, `width` the largest client rank (see Method.aggregation_cost).
    """
    return methods.get(method).aggregation_cost(m, n, R, width)
