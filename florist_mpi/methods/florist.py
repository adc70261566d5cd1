"""FLoRIST (arXiv 2506.09199): the SVD of the stacked update, truncated to τ of its energy."""

from __future__ import annotations

from florist_mpi import costmodel
from florist_mpi.methods.base import Method


class Florist(Method):
    name = "florist"
    uses_tau = True

    def aggregate(self, stack, p, *, tau, max_rank, route, out_dtype):
        from florist_mpi import lowrank

        return lowrank.florist(stack, p, tau, max_rank, route, out_dtype)

    def checks_finite(self, route: str) -> bool:
        return route == "svd"  # the Gram and dense routes detect NaN/Inf from their own products

    def plan(self, m, n, K, R, r_max, r_g):
        # the cheaper exact route ("gram" or "dense"), its final products at r_g included; the same
        # plan picks the route in aggregate(route="auto")
        return costmodel.florist_plan(m, n, R, r_g)

    def exact_global_update(self, run):
        cap = run.config.federation.max_rank
        uncapped = cap is None or int(run.ranks.to_numpy().max(initial=0)) < cap
        if run.tau >= 1.0 and uncapped:
            return "the logged global update (florist at τ = 1 keeps every direction: exact)"
        return None
