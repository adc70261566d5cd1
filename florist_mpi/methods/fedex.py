"""FedEx-LoRA (arXiv 2410.09432): FedIT's averaged factors, made exact by folding the residual into the base.

Clients receive B̄ = Σ p_k B_k and Ā = Σ p_k A_k (ranks zero-padded to r_max, as in FedIT) and start
the next round from them; the part of ΔW = Σ p_k B_k A_k that B̄Ā misses, ΔW − B̄Ā, is merged into
every client's frozen base. The global model after a round is therefore base + ΔW exactly: the base
carries the residuals, and B̄Ā is kept beside it (clients train on top of it).

On the wire, each client receives B̄, Ā and the residual. The residual's low-rank form
[B_s diag(p) | −B̄] [A_s; Ā] has rank q = R' + r_max (R' = Σ r_k of the weighted clients) and takes
q (m + n) floats; where m n is smaller the residual is sent as the dense m × n matrix. The cheaper
of the two is counted (`downlink_floats`). Heterogeneous ranks: a rank-r_k client starts from its
rank-r_k prefix of B̄Ā (what its adapter can hold), so only equal ranks make every client's start
equal the global model; the global model itself is exact either way.
"""

from __future__ import annotations

from florist_mpi import costmodel
from florist_mpi.methods.base import Method


class FedEx(Method):
    name = "fedex"
    keeps_base = True
    folds_residual = True

    def aggregate(self, stack, p, *, tau, max_rank, route, out_dtype):
        from florist_mpi import lowrank

        return lowrank.fedex(stack, p, out_dtype)

    def downlink_floats(self, global_rank: int, client_rank: int, m: int, n: int, residual_rank: int = 0) -> int:
        # B̄ and Ā, plus the residual in the cheaper of its low-rank (q (m + n)) and dense (m n) forms
        return self.wire_floats(global_rank, m, n) + min(residual_rank * (m + n), m * n)

    def plan(self, m, n, K, R, r_max, r_g):
        # FedIT's weighted sums of B and A over the R stack columns, 2 R (m + n) (the p-scaled B stack
        # they form is also the residual's left block), plus negating B̄ for the residual, m r_max; the
        # logged spectrum of the rank-r_max product is not charged
        return costmodel.RoutePlan("average", 2.0 * R * (m + n) + m * r_max, costmodel.spectrum_flops(m, n, r_max))

    # exact_global_update stays None: the logged B, A alone are not ΔW (the residual completes it), so
    # sweep-tau re-aggregates the logged client adapters
