"""FedIT: the weighted average of the B factors times that of the A factors (ranks zero-padded)."""

from __future__ import annotations

from florist_mpi.methods.base import Method


class FedIT(Method):
    name = "fedit"

    def aggregate(self, factors, p, *, tau, max_rank, route, out_dtype):
        from florist_mpi import lowrank

        return lowrank.fedit(factors, p, out_dtype)

    def server_flops(self, m, n, K, R, r_max, r_g):
        return 2.0 * K * r_max * (m + n)  # weighted sums of zero-padded B and A
