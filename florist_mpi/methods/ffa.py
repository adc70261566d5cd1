"""FFA-LoRA: every client trains B only, on one A drawn from the run seed; the server averages B.

Only B travels (A is frozen and derived from the shared seed).
"""

from __future__ import annotations

from florist_mpi.methods.base import Method


class FFALoRA(Method):
    name = "ffa"
    frozen_A = True

    def aggregate(self, factors, p, *, tau, max_rank, route, out_dtype):
        from florist_mpi import lowrank

        return lowrank.ffa(factors, p, out_dtype)

    def wire_floats(self, rank: int, m: int, n: int) -> int:
        return rank * m

    def trainable_weights(self, rank: int, m: int, n: int) -> int:
        return rank * m

    def server_flops(self, m, n, K, R, r_max, r_g):
        return 2.0 * K * r_max * m  # weighted sum of B

    def exact_global_update(self, run):
        return "ffa's logged global update (averaged B times the shared A, exact)"
