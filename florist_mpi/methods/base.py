"""What every aggregation method defines: the base class of florist_mpi.methods.

A method is everything that differs between FLoRIST and its baselines, in one object:
its aggregation (calling the pure math in florist_mpi.lowrank), what a client uploads
and downloads, what clients start from, whether the global update is merged into the
base, and its cost (one `plan`, which route selection, owner balancing and the simulated
clock all read). The round loop, replay, export, report and sweep ask the method instead of
testing its name.

The contract of `aggregate` (checked by `check_result` at the aggregation entry point, so a
method added from outside hears of a breach at once, with its name):
  * it returns a lowrank.AggregationResult for the module it was given (m×n);
  * `B` is m×rank and `A` is rank×n: `result.rank == B.shape[1] == A.shape[0]`. Sharded mode
    relies on it: owners all-gather rank, then rank·(m + n) floats of B and A per module, and
    every rank slices the buffer by that rank;
  * B and A are in `out_dtype` on the inputs' device, `singular_values` is a 1-D tensor and
    `energy` a number in [0, 1];
  * `client_ranks`, when set (FlexLoRA, HetLoRA), holds one prefix rank ≤ rank per client;
  * `residual`, when set (FedEx-LoRA, whose class sets `folds_residual`), is a pair of factors
    (m×q, q×n, q ≥ 0) in `out_dtype` on the inputs' device: the round's global update is
    B @ A + residual[0] @ residual[1], and the residual is merged into the base while B @ A is
    kept beside it;
  * it never writes into the stack's B and A (the caller's, often an exchange buffer) and
    never returns them as B or A (copy instead).

`lowrank` is imported inside the functions that use it, so that reading a config (which
validates the method name against the registry) does not import torch.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any, ClassVar

from florist_mpi.costmodel import RoutePlan

if TYPE_CHECKING:
    import torch

    from florist_mpi.lowrank import AggregationResult, ClientStack


class Method:
    """One aggregation method; subclasses set `name` and implement `aggregate` and `plan`."""

    name: ClassVar[str] = ""
    # τ and federation.max_rank shape its global rank (FLoRIST); the other methods ignore them.
    uses_tau: ClassVar[bool] = False
    # Clients train B only, on an A drawn once from the run seed and shared by all (FFA-LoRA).
    frozen_A: ClassVar[bool] = False
    # The global update is kept beside the base instead of merged into it: clients start each
    # round from it (their rank-r_k prefix) and the global model is base + update (FlexLoRA).
    keeps_base: ClassVar[bool] = False
    # The result carries a `residual` (m×q, q×n factors) that every rank merges into the base after the
    # round, beside the kept B @ A (FedEx-LoRA); it travels with the global factors and is logged.
    folds_residual: ClassVar[bool] = False

    # ------------------------------------------------------------------ math

    def aggregate(
        self, stack: ClientStack, p: torch.Tensor, *, tau: float, max_rank: int | None, route: str, out_dtype
    ) -> AggregationResult:
        """Global factors of one module from its clients' stacked factors (lowrank.ClientStack: B m×R,
        A R×n, ranks r_k) and the weights p (float64 tensor of K, Σ p_k = 1), under the contract above."""
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

    def downlink_floats(self, global_rank: int, client_rank: int, m: int, n: int, residual_rank: int = 0) -> int:
        """Floats one rank-`client_rank` client receives for one m×n module after a round whose global
        factors have rank `global_rank` (and, for methods that fold one, a rank-`residual_rank` residual)."""
        return self.wire_floats(self.download_rank(global_rank, client_rank), m, n)

    def plan(self, m: int, n: int, K: int, R: int, r_max: int, r_g: int) -> RoutePlan:
        """The route `aggregate` takes on one m×n module and its FLOPs (florist_mpi.costmodel): K clients,
        R = Σ r_k, r_max = max r_k, r_g the module's global rank. The one cost function of a method."""
        raise NotImplementedError

    def server_flops(self, m: int, n: int, K: int, R: int, r_max: int, r_g: int) -> float:
        """FLOPs of aggregating one m×n module on the simulated server (docs/simulated-clock.md): the
        plan's aggregation FLOPs (a logged spectrum, work of this simulator only, is not charged)."""
        return self.plan(m, n, K, R, r_max, r_g).flops

    def aggregation_cost(self, m: int, n: int, K: int, R: int, r_max: int) -> float:
        """Estimated work of aggregating one m×n module, for spreading modules over workers: the plan's
        total FLOPs (logged spectrum included). Owners are chosen before any r_g is known, so the final
        products are priced at the largest global rank possible, r_g = min(R, m, n)."""
        return self.plan(m, n, K, R, r_max, min(R, m, n)).total_flops

    # ------------------------------------------------------------- analysis

    def exact_global_update(self, run: Any) -> str | None:
        """How a run's logged global factors hold the exact ΔW = Σ p_k B_k A_k, or None if they do not
        (sweep-tau then re-aggregates the logged client adapters)."""
        return None


def contract_breach(result: Any, stack: ClientStack, out_dtype) -> str | None:
    """What in `result` breaks the contract (module docstring) for this stack, or None."""
    from florist_mpi.lowrank import AggregationResult

    if not isinstance(result, AggregationResult):
        return f"returned {type(result).__name__}, not an AggregationResult"
    (m, n), B, A, rank = stack.shape, result.B, result.A, result.rank
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        return f"rank is {rank!r}, not an integer"
    if B.dim() != 2 or A.dim() != 2 or B.shape != (m, rank) or A.shape != (rank, n):
        return (
            f"rank {rank} but B is {tuple(B.shape)} and A is {tuple(A.shape)}; "
            f"B must be {m}×rank and A rank×{n} (rank == B.shape[1] == A.shape[0])"
        )
    if B.dtype != out_dtype or A.dtype != out_dtype or B.device != stack.B.device or A.device != stack.B.device:
        return f"B and A must be {out_dtype} on {stack.B.device} (got {B.dtype} on {B.device}, {A.dtype} on {A.device})"
    if result.singular_values.dim() != 1:
        return "singular_values must be a 1-D tensor"
    if not 0.0 <= float(result.energy) <= 1.0 + 1e-9:
        return f"energy {result.energy!r} is not a fraction in [0, 1]"
    if result.client_ranks is not None and (
        result.client_ranks.shape != (stack.count,) or bool((result.client_ranks > rank).any())
    ):
        return f"client_ranks must hold {stack.count} prefix ranks of at most {rank}"
    return _residual_breach(result.residual, stack, out_dtype)


def _residual_breach(residual: Any, stack: ClientStack, out_dtype) -> str | None:
    """What breaks the contract in a result's `residual` (None, or m×q and q×n factors), or None."""
    if residual is None:
        return None
    (m, n), device = stack.shape, stack.B.device
    if not isinstance(residual, tuple) or len(residual) != 2:
        return "residual must be None or a pair (m×q factor, q×n factor)"
    left, right = residual
    if (left.dim() != 2 or right.dim() != 2 or left.shape[0] != m or right.shape[1] != n
            or left.shape[1] != right.shape[0]):
        return f"residual factors are {tuple(left.shape)} and {tuple(right.shape)}; they must be {m}×q and q×{n}"
    if left.dtype != out_dtype or right.dtype != out_dtype or left.device != device or right.device != device:
        return f"residual factors must be {out_dtype} on {device} (got {left.dtype} on {left.device})"
    return None
