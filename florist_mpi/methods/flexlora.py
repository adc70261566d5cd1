"""FlexLoRA: the dense ΔW = Σ p_k B_k A_k and its SVD; each client receives its rank-r_k prefix.

The global update is kept beside the base, not merged into it: clients start the next round
from their prefix of it, and the global model is base + the update.
"""

from __future__ import annotations

from florist_mpi import costmodel
from florist_mpi.methods.base import Method


class FlexLoRA(Method):
    name = "flexlora"
    keeps_base = True

    def aggregate(self, stack, p, *, tau, max_rank, route, out_dtype):
        from florist_mpi import lowrank

        return lowrank.flexlora(stack, p, out_dtype)

    def download_rank(self, global_rank: int, client_rank: int) -> int:
        return min(global_rank, client_rank)

    def plan(self, m, n, K, R, r_max, r_g):
        a, b = max(m, n), min(m, n)
        # forming ΔW, then its thin SVD (Golub & Van Loan: 6ab² + 20b³ with the vectors)
        return costmodel.RoutePlan("dense_svd", 2.0 * m * n * R + 6.0 * a * b**2 + 20.0 * b**3)
