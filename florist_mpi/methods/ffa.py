"""FFA-LoRA: every client trains B only, on one A drawn from the run seed; the server averages B.

Only B travels (A is frozen and derived from the shared seed).
"""

from __future__ import annotations

from florist_mpi import costmodel
from florist_mpi.methods.base import Method


class FFALoRA(Method):
    name = "ffa"
    frozen_A = True

    def aggregate(self, stack, p, *, tau, max_rank, route, out_dtype):
        from florist_mpi import lowrank

        return lowrank.ffa(stack, p, out_dtype)

    def wire_floats(self, rank: int, m: int, n: int) -> int:
        return rank * m

    def trainable_weights(self, rank: int, m: int, n: int) -> int:
        return rank * m

    def plan(self, m, n, K, R, r_max, r_g):
        # weighted sum of B over the R stack columns; the logged spectrum of the rank-r_max product
        return costmodel.RoutePlan("average", 2.0 * R * m, costmodel.spectrum_flops(m, n, r_max))

    def exact_global_update(self, run):
        return "ffa's logged global update (averaged B times the shared A, exact)"
