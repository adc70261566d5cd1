"""The one cost model of aggregation: which route a method takes on one module, and its FLOPs.

Pure arithmetic on shapes (no torch). Three users, one answer:
  * `aggregate()` picks FLoRIST's exact route with `florist_plan(...).route` (florist_mpi.lowrank);
  * sharded mode balances module owners on `Method.aggregation_cost`, built on `Method.plan`;
  * the simulated clock charges `Method.server_flops`, which is `Method.plan(...).flops`.

Counts are in GEMM-flop equivalents: 2 FLOPs per multiply-add of a matrix product, and
LAPACK factorisations weighted by how long they take against float64 GEMM (measured: see the
constants). A module is m×n (B_k is m×r_k, A_k is r_k×n), K clients, R = Σ r_k, r_max = max r_k,
r_g the global rank, s = min(m, n), l = max(m, n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# A float64 s×s symmetric eigendecomposition (values and vectors) costs this many s³ GEMM
# flops: torch.linalg.eigh at s = 2048…4096 took 11–15× the time of s³ flops of float64 GEMM
# (benchmarks/aggregation_routes.py, README "Aggregation at many clients").
EIGH_FLOPS_PER_CUBE = 13.0
# The Gram route's small dense work (Cholesky, triangular inverse, the core C_B G_A C_Bᵀ): about 5 R³.
GRAM_CORE_FLOPS_PER_CUBE = 5.0
# A thin SVD (vectors kept) takes this many times the time of its Golub & Van Loan count,
# 6·rows·cols² + 20·cols³, in float64 GEMM flops: torch.linalg.svd on the 2-core machine measured
# 2.6–5.4 (4096×512, 4096×1024, 512×384, 1024², 2048²; LAPACK's bidiagonalisation runs at
# matrix-vector speed; `benchmarks/aggregation_routes.py --lapack-weights`).
THIN_SVD_WEIGHT = 3.5
# The Gram route is never chosen once R reaches this fraction of min(m, n): decaying-spectrum client
# stacks measured there lose their Cholesky factor (at 4096² with rank-16 clients, R = 0.75 s was fine
# and 0.875 s was not; past R = s the stack is rank-deficient). Where a stack loses it below this fill,
# the Gram route falls back to the cheaper of the dense route and an m×R SVD (`gram_fallback`).
GRAM_MAX_FILL = 0.8
# Torch has no syrk: a symmetric Gram forms its upper triangle in strips of at least GRAM_STRIP
# columns, at most GRAM_MAX_STRIPS of them. On the quiet 2-core machine, 32 Grams 4096×152 of
# benchmarks/aggregation.py in 2–4 strips made the whole route 7–10% faster than one GEMM each.
GRAM_STRIP = 64
GRAM_MAX_STRIPS = 4


@dataclass(frozen=True)
class RoutePlan:
    """What aggregating one module costs: the route taken and its FLOPs."""

    route: str  # florist: "gram" | "dense"; baselines: "average", "stack", "dense_svd" (a label, no choice)
    flops: float  # the aggregation itself: what a real server runs (the simulated clock charges this)
    spectrum_flops: float = 0.0  # the logged spectrum of a baseline's result: work here, not a deployment's

    @property
    def total_flops(self) -> float:
        """Everything `aggregate()` computes (what sharded mode balances owners on)."""
        return self.flops + self.spectrum_flops


def gram_strips(width: int) -> int:
    """Strips of columns in which a width-column Gram forms its upper triangle (lowrank.symmetric_gram):
    one (a plain GEMM) below 2·GRAM_STRIP columns, then up to GRAM_MAX_STRIPS."""
    return max(1, min(GRAM_MAX_STRIPS, width // GRAM_STRIP))


def gram_flops(rows: int, width: int) -> float:
    """A symmetric Gram XᵀX of a rows×width X formed in b strips: the upper triangle's blocks,
    rows·width²·(1 + 1/b), between a syrk's rows·width² and a GEMM's 2·rows·width²."""
    return float(rows) * width * width * (1.0 + 1.0 / gram_strips(width))


def thin_svd_flops(rows: int, cols: int) -> float:
    """A thin SVD (values and vectors) of a rows×cols matrix."""
    tall, short = float(max(rows, cols)), float(min(rows, cols))
    return THIN_SVD_WEIGHT * (6.0 * tall * short**2 + 20.0 * short**3)


def route_costs(m: int, n: int, R: int) -> dict[str, float]:
    """FLoRIST's two exact routes on one m×n module with stack width R, before the final products.

    gram:  Grams of both stacks, (m+n)R² to 2(m+n)R² (`gram_flops`), then R×R Cholesky, core and
           eigensolver.
           inf from R = GRAM_MAX_FILL · min(m, n) on (never chosen there).
    dense: ΔW = B_s A_s, 2mnR; its smaller Gram (`gram_flops`); an s×s eigensolver.
    """
    small, large = min(m, n), max(m, n)
    gram = gram_flops(m, R) + gram_flops(n, R) + (EIGH_FLOPS_PER_CUBE + GRAM_CORE_FLOPS_PER_CUBE) * float(R) ** 3
    dense = 2.0 * m * n * R + gram_flops(large, small) + EIGH_FLOPS_PER_CUBE * float(small) ** 3
    return {"gram": gram if R < GRAM_MAX_FILL * small else math.inf, "dense": dense}


def exact_route(m: int, n: int, R: int) -> str:
    """The cheaper exact route ("gram" or "dense") for an m×n module with stack width R."""
    costs = route_costs(m, n, R)
    return "dense" if costs["dense"] < costs["gram"] else "gram"


def final_products_flops(route: str, m: int, n: int, R: int, r_g: int) -> float:
    """The global factors formed after the truncation to r_g.

    gram:  B_s (m×R) and A_s (R×n) times R×r_g matrices, 2(m+n)R r_g.
    dense: ΔW (m×n) projected on r_g singular vectors, 2mn r_g.
    """
    return 2.0 * (m + n) * R * r_g if route == "gram" else 2.0 * m * n * r_g


def florist_plan(m: int, n: int, R: int, r_g: int) -> RoutePlan:
    """FLoRIST on one module: the cheaper exact route and its FLOPs, final products included."""
    costs = route_costs(m, n, R)
    route = "dense" if costs["dense"] < costs["gram"] else "gram"
    return RoutePlan(route, costs[route] + final_products_flops(route, m, n, R, r_g))


def spectrum_flops(m: int, n: int, width: int) -> float:
    """Singular values of a product B A (B m×width): the cheaper exact route, no products after."""
    return min(route_costs(m, n, width).values())


def gram_fallback(m: int, n: int, R: int) -> str:
    """Where the Gram route finds no Cholesky factor: "dense" (the dense route from scratch) or
    "svd_basis" (an exact orthonormal basis of the m×R B stack by a thin SVD), whichever is cheaper.

    The Grams already formed are spent either way. Well below the fill limit the m×R SVD is the
    cheaper; from about R = 0.5 min(m, n) on (square modules) the dense route is: near the fill
    limit, the cliff it guards, the SVD costs about 4× the whole dense route (measured at 4096²:
    283 s for the Gram route with the SVD basis at R = 3584, 59 s for the dense route).
    """
    basis = thin_svd_flops(m, R) + (EIGH_FLOPS_PER_CUBE + GRAM_CORE_FLOPS_PER_CUBE) * float(R) ** 3
    return "dense" if route_costs(m, n, R)["dense"] < basis else "svd_basis"
