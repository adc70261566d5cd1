"""FLoRA: the clients' factors stacked, B_s = [B_1 … B_K], A_s = [p_1 A_1; …; p_K A_K] (exact ΔW)."""

from __future__ import annotations

from florist_mpi.methods.base import Method


class FLoRA(Method):
    name = "flora"

    def aggregate(self, factors, p, *, tau, max_rank, route, out_dtype):
        from florist_mpi import lowrank

        return lowrank.flora(factors, p, out_dtype)

    def aggregation_cost(self, m, n, R, width):
        from florist_mpi.lowrank import route_costs

        return min(route_costs(m, n, R).values())  # its spectrum needs FLoRIST's factorisation

    def server_flops(self, m, n, K, R, r_max, r_g):
        return float(R * (m + n))  # scaling while stacking

    def exact_global_update(self, run):
        return "flora's logged global update (the client stacks, exact)"
