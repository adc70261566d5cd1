"""A method defined outside the package, as a user adds one: FedAvg of the dense updates, cut to the
largest client rank by the SVD, but sent to every client whole (unlike FlexLoRA, which keeps the base).

The whole definition: a Method subclass (aggregation, cost plan) and `register(...)`.
"""

from __future__ import annotations

import torch

from florist_mpi import costmodel, lowrank, methods


class DenseFedAvg(methods.Method):
    name = "fedavg_dense"

    def aggregate(self, stack, p, *, tau, max_rank, route, out_dtype):
        delta = lowrank.dense_update(stack, p)  # Σ p_k B_k A_k in float64
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        width = min(int(stack.ranks.max()), S.numel())
        B, A = U[:, :width] * S[:width], Vh[:width]
        energy = lowrank.retained(S, width)
        return lowrank.AggregationResult(B.to(out_dtype), A.to(out_dtype), width, S, energy, method=self.name)

    def plan(self, m, n, K, R, r_max, r_g):
        a, b = max(m, n), min(m, n)
        return costmodel.RoutePlan("dense_svd", 2.0 * m * n * R + 6.0 * a * b**2 + 20.0 * b**3)


def register() -> methods.Method:
    return methods.register(DenseFedAvg())
