"""FedIT: the weighted average of the B factors times that of the A factors (ranks zero-padded)."""

from __future__ import annotations

from florist_mpi import costmodel
from florist_mpi.methods.base import Method


class FedIT(Method):
    name = "fedit"

    def aggregate(self, stack, p, *, tau, max_rank, route, out_dtype):
        from florist_mpi import lowrank

        return lowrank.fedit(stack, p, out_dtype)

    def plan(self, m, n, K, R, r_max, r_g):
        # weighted sums of B and A over the R stack columns (zero-padded to r_max); the logged
        # spectrum of the rank-r_max product
        return costmodel.RoutePlan("average", 2.0 * R * (m + n), costmodel.spectrum_flops(m, n, r_max))
