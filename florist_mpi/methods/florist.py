"""FLoRIST (arXiv 2506.09199): the SVD of the stacked update, truncated to τ of its energy."""

from __future__ import annotations

from florist_mpi.methods.base import Method


class Florist(Method):
    name = "florist"
    uses_tau = True

    def aggregate(self, factors, p, *, tau, max_rank, route, out_dtype):
        from florist_mpi import lowrank

        return lowrank.florist(factors, p, tau, max_rank, route, out_dtype)

    def checks_finite(self, route: str) -> bool:
        return route == "svd"  # the Gram and dense routes detect NaN/Inf from their own products

    def aggregation_cost(self, m, n, R, width):
        from florist_mpi.lowrank import route_costs

        return min(route_costs(m, n, R).values())  # the cheaper exact route

    def server_flops(self, m, n, K, R, r_max, r_g):
        # Gram matrices of the stacks, Cholesky factors and an R × R eigenproblem, then the stacks
        # times R × r_g (florist_mpi.lowrank, gram route)
        return 2.0 * (m + n) * R**2 + 14.0 * R**3 + 2.0 * (m + n) * R * r_g

    def exact_global_update(self, run):
        cap = run.config.federation.max_rank
        uncapped = cap is None or int(run.ranks.to_numpy().max(initial=0)) < cap
        if run.tau >= 1.0 and uncapped:
            return "the logged global update (florist at τ = 1 keeps every direction: exact)"
        return None
