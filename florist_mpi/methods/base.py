"""What every aggregation method defines: the base class of florist_mpi.methods.

A method is everything that differs between FLoRIST and its baselines, in one object:
its aggregation (calling the pure math in florist_mpi.lowrank), what a client uploads
and downloads, what clients start from, whether the global update is merged into the
base, and its cost on the simulated clock. The round loop, replay, export, report and
sweep ask the method instead of testing its name.

`lowrank` is imported inside the functions that use it, so that reading a config (which
validates the method name against the registry) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from florist_mpi.lowrank import AggregationResult, Factors


class Method:
    """One aggregation method; subclasses set `name` and implement `aggregate` and `server_flops`."""

    name: ClassVar[str] = ""
    # τ and federation.max_rank shape its global rank (FLoRIST); the other methods ignore them.
    uses_tau: ClassVar[bool] = False
    # Clients train B only, on an A drawn once from the run seed and shared by all (FFA-LoRA).
    frozen_A: ClassVar[bool] = False
    # The global update is kept beside the base instead of merged into it: clients start each
    # round from it (their rank-r_k prefix) and the global model is base + update (FlexLoRA).
    keeps_base: ClassVar[bool] = False

    # ------------------------------------------------------------------ math

    def aggregate(
        self, factors: Factors, p: list[float], *, tau: float, max_rank: int | None, route: str, out_dtype
    ) -> AggregationResult:
        """Global factors of one module from the clients' (B_k, A_k) and weights p_k (Σ p_k = 1)."""
        raise NotImplementedError

    def checks_finite(self, route: str) -> bool:
        """Whether the entry point scans the factors for NaN/Inf before `aggregate` (True unless the
        method detects them itself more cheaply)."""
        return True

    # ------------------------------------------------------- bytes and compute

    def wire_floats(self, rank: int, m: int, n: int) -> int:
        """Floats one module's rank-`rank` factors (m×rank B, rank×n A) take on the wire."""
        return rank * (m + n)

    def trainable_weights(self, rank: int, m: int, n: int) -> int:
        """Weights of one module's rank-`rank` adapter that a client trains."""
        return rank * (m + n)

    def download_rank(self, global_rank: int, client_rank: int) -> int:
        """Rank of the global factors one client receives."""
        return global_rank

    def aggregation_cost(self, m: int, n: int, R: int, width: int) -> float:
        """Estimated work of aggregating one m×n module (for spreading modules over workers); R = Σ r_k,
        `width` the largest client rank. Default: weighted sums of the factors, then the spectrum of a
        width-`width` product."""
        from florist_mpi.lowrank import route_costs

        return 2.0 * (m + n) * R + min(route_costs(m, n, width).values())

    def server_flops(self, m: int, n: int, K: int, R: int, r_max: int, r_g: int) -> float:
        """FLOPs of aggregating one m×n module on the simulated server (docs/simulated-clock.md):
        K clients, R = Σ r_k, r_max = max r_k, r_g the module's global rank."""
        raise NotImplementedError

    # ------------------------------------------------------------- analysis

    def exact_global_update(self, run: Any) -> str | None:
        """How a run's logged global factors hold the exact ΔW = Σ p_k B_k A_k, or None if they do not
        (sweep-tau then re-aggregates the logged client adapters)."""
        return None
