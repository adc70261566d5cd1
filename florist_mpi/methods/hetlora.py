"""HetLoRA (arXiv 2401.06432): heterogeneous ranks zero-padded, aggregated with sparsity weights.

Client k's weight is the Frobenius norm of its update, ‖B_k A_k‖_F, normalised over the clients
(the paper's sparsity-weighted aggregation; sample counts do not enter). The global adapter
B̄ = Σ w_k pad(B_k), Ā = Σ w_k pad(A_k) has rank r_max; each client receives its first r_k
columns of B̄ and rows of Ā and starts the next round from them. The global update is kept beside
the base (as FlexLoRA's): the global model is base + B̄Ā. The paper's local rank self-pruning is
not implemented (every client trains at its configured rank).
"""

from __future__ import annotations

from florist_mpi import costmodel
from florist_mpi.methods.base import Method


class HetLoRA(Method):
    name = "hetlora"
    keeps_base = True

    def aggregate(self, stack, p, *, tau, max_rank, route, out_dtype):
        from florist_mpi import lowrank

        return lowrank.hetlora(stack, p, out_dtype)

    def download_rank(self, global_rank: int, client_rank: int) -> int:
        return min(global_rank, client_rank)

    def plan(self, m, n, K, R, r_max, r_g):
        # the update norms: each client's two Grams, padded to r_max in one batch, 2 K r_max² (m + n),
        # and their elementwise product summed, 2 K r_max²; then the weighted sums of B and A over the
        # R stack columns, 2 R (m + n). The logged spectrum of the rank-r_max product is not charged.
        norms = 2.0 * K * r_max**2 * (m + n) + 2.0 * K * r_max**2
        return costmodel.RoutePlan("average", norms + 2.0 * R * (m + n), costmodel.spectrum_flops(m, n, r_max))
