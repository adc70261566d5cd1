"""FLoRA: the clients' factors stacked, B_s = [B_1 … B_K], A_s = [p_1 A_1; …; p_K A_K] (exact ΔW)."""

from __future__ import annotations

from florist_mpi import costmodel
from florist_mpi.methods.base import Method


class FLoRA(Method):
    name = "flora"

    def aggregate(self, stack, p, *, tau, max_rank, route, out_dtype):
        from florist_mpi import lowrank

        return lowrank.flora(stack, p, out_dtype)

    def plan(self, m, n, K, R, r_max, r_g):
        # scaling while stacking; the logged spectrum needs FLoRIST's factorisation of the whole stack
        return costmodel.RoutePlan("stack", float(R * (m + n)), costmodel.spectrum_flops(m, n, R))

    def exact_global_update(self, run):
        return "flora's logged global update (the client stacks, exact)"
