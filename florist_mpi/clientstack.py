"""One module's client factors as one stack, and the checks of what the aggregation is given.

Every client k supplies its effective update ΔW_k = B_k @ A_k (LoRA scaling folded into B_k),
B_k of shape m×r_k and A_k of shape r_k×n. Side by side they form the stacks
    B_s = [B_1 … B_K]  (m×R)   and   A_s = [A_1; …; A_K]  (R×n),   R = Σ r_k,
with client k at columns (rows) offset_k … offset_k + r_k - 1, offset_k = r_1 + … + r_{k-1}, in
client order: a `ClientStack`. The aggregation works on stacks: per-client operations are index
arithmetic over the R columns (`column_client`, `position`, `segment_sum`), never a loop over
clients, so 10,000 rank-8 clients cost what their arithmetic costs.

Pure torch, no MPI, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch

Factors = Sequence[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ClientStack:
    """The clients' factors of one m×n module, stacked (see the module docstring).

    B: m×R, any strides: the MPI exchange delivers Bᵀ as one contiguous R×m buffer and passes
       `buffer.T`, a view; nothing is copied for a layout.
    A: R×n, rows in the same client order.
    ranks: r_k ≥ 0, one per client, Σ r_k = R (int64, on the CPU).
    The aggregation only reads B and A (never writes into the caller's buffers); the weights
    (sample counts n_k) are passed beside the stack, and p_k = n_k / Σ n is applied inside.
    """

    B: torch.Tensor
    A: torch.Tensor
    ranks: torch.Tensor

    def __post_init__(self) -> None:
        ranks = self.ranks if isinstance(self.ranks, torch.Tensor) else torch.as_tensor(self.ranks)
        object.__setattr__(self, "ranks", ranks.to(device="cpu", dtype=torch.int64).reshape(-1))

    @property
    def count(self) -> int:
        """K, the number of clients."""
        return self.ranks.numel()

    @property
    def width(self) -> int:
        """R = Σ r_k, the stack width."""
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of the module."""
        return self.B.shape[0], self.A.shape[1]

    @cached_property
    def offsets(self) -> torch.Tensor:
        """offset_k: client k's first column (K, int64, CPU)."""
        return torch.cumsum(self.ranks, 0) - self.ranks

    @cached_property
    def column_client(self) -> torch.Tensor:
        """The client of every stack column (R, int64, on the stack's device)."""
        clients = torch.arange(self.count, device=self.B.device)
        return torch.repeat_interleave(clients, self.ranks.to(self.B.device), output_size=self.width)

    @cached_property
    def position(self) -> torch.Tensor:
        """Every stack column's index inside its client's factor, 0 … r_k - 1 (R, int64, stack's device)."""
        columns = torch.arange(self.width, device=self.B.device)
        return columns - self.offsets.to(self.B.device)[self.column_client]

    def segment_sum(self, per_column: torch.Tensor) -> torch.Tensor:
        """Per-client sums of a per-column quantity (R,) -> (K,)."""
        out = torch.zeros(self.count, dtype=per_column.dtype, device=per_column.device)
        return out.index_add_(0, self.column_client, per_column)

    def per_column(self, per_client: torch.Tensor) -> torch.Tensor:
        """A per-client quantity spread over the client's columns (K,) -> (R,)."""
        return per_client[self.column_client]

    def select(self, clients: torch.Tensor) -> ClientStack:
        """The stack of the clients where `clients` (K, bool) is true (copies their columns)."""
        columns = self.per_column(clients.to(self.B.device))
        return ClientStack(self.B[:, columns], self.A[columns], self.ranks[clients.cpu()])

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(B_k, A_k) views, one per client (a loop over clients: for methods that need one)."""
        bounds = self.offsets.tolist()
        return [(self.B[:, lo : lo + r], self.A[lo : lo + r]) for lo, r in zip(bounds, self.ranks.tolist())]


# ------------------------------------------------------------------------ building and checking


def check_factors(factors: Factors) -> tuple[int, int]:
    """The list form, client by client: (m, n), or a ValueError naming the first bad client."""
    if not factors:
        raise ValueError("no client factors given: pass a non-empty list of (B, A) pairs")
    m = n = None
    for k, pair in enumerate(factors):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"client {k}: expected a (B, A) pair")
        B, A = pair
        if not isinstance(B, torch.Tensor) or not isinstance(A, torch.Tensor):
            raise ValueError(f"client {k}: B and A must be torch tensors")
        if B.dim() != 2 or A.dim() != 2:
            raise ValueError(f"client {k}: B and A must be 2-D matrices (got {B.dim()}-D and {A.dim()}-D)")
        if B.shape[1] != A.shape[0]:
            raise ValueError(
                f"client {k}: B is {tuple(B.shape)} but A is {tuple(A.shape)}; "
                "B's columns must equal A's rows (the rank)"
            )
        if m is None:
            m, n = B.shape[0], A.shape[1]
        elif (B.shape[0], A.shape[1]) != (m, n):
            raise ValueError(
                f"client {k}: update is {B.shape[0]}×{A.shape[1]} but client 0's is {m}×{n}; "
                "all clients must adapt the same module"
            )
        if B.device != factors[0][0].device or A.device != B.device:
            raise ValueError(f"client {k}: factors must be on client 0's device ({factors[0][0].device})")
    return m, n


def stack_factors(factors: Factors | ClientStack) -> ClientStack:
    """The stack of a list of (B_k, A_k) pairs: one concatenation per factor, in the pairs' dtype (a
    native-dtype concatenation is the fast one; the kernels convert to float64 as they go). A
    ClientStack passes through, checked. A ValueError names the first bad client."""
    if isinstance(factors, ClientStack):
        check_stack(factors)
        return factors
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence):
        raise ValueError("client factors must be a list of (B, A) pairs or a ClientStack")
    if not factors:
        check_factors(factors)
    try:  # the common case without a Python check per client: any failure goes to the careful check
        Bs, As = zip(*factors)
        ranks = [B.shape[1] for B in Bs]
        if ranks == [A.shape[0] for A in As]:
            B, A = torch.cat(Bs, 1), torch.cat(As, 0)  # raises on a client of another shape or device
            if B.dim() == 2 and A.dim() == 2 and B.dtype.is_floating_point and A.dtype.is_floating_point:
                common = torch.promote_types(B.dtype, A.dtype)  # one dtype for both stacks
                return ClientStack(B.to(common), A.to(common), torch.tensor(ranks, dtype=torch.int64))
    except (TypeError, ValueError, RuntimeError, IndexError, AttributeError):
        pass
    check_factors(factors)  # raises, naming the client
    raise ValueError("client factors could not be stacked: give 2-D floating (B, A) pairs on one device")


def check_stack(stack: ClientStack) -> tuple[int, int]:
    """(m, n) of a well-formed stack, or a ValueError saying what to fix."""
    B, A, ranks = stack.B, stack.A, stack.ranks
    if not isinstance(B, torch.Tensor) or not isinstance(A, torch.Tensor):
        raise ValueError("ClientStack: B and A must be torch tensors")
    if B.dim() != 2 or A.dim() != 2:
        raise ValueError(f"ClientStack: B and A must be 2-D (got {B.dim()}-D and {A.dim()}-D)")
    if ranks.numel() == 0:
        raise ValueError("no client factors given: the ClientStack has no ranks (one per client)")
    if B.dtype != A.dtype or B.device != A.device or not B.dtype.is_floating_point:
        raise ValueError(f"ClientStack: B and A must share one floating dtype and device (got {B.dtype}, {A.dtype})")
    if bool((ranks < 0).any()):
        raise ValueError("ClientStack: ranks must be non-negative")
    total = int(ranks.sum())
    if B.shape[1] != total or A.shape[0] != total:
        raise ValueError(
            f"ClientStack: ranks sum to {total} but B is {tuple(B.shape)} and A is {tuple(A.shape)}; "
            "B needs Σ r_k columns and A Σ r_k rows"
        )
    return B.shape[0], A.shape[1]


def check_finite(stack: ClientStack) -> None:
    """A ValueError naming the first client whose factors hold NaN or Inf (one vectorised pass)."""
    bad = ~torch.isfinite(stack.B).all(dim=0) | ~torch.isfinite(stack.A).all(dim=1)
    if bool(bad.any()):
        client = int(stack.column_client[bad.nonzero()[0, 0]])
        raise ValueError(f"client {client}: factors contain NaN or Inf; exclude that client before aggregating")


def normalised_weights(weights, count: int) -> list[float]:
    """p_k = n_k / Σ n as Python floats (exact sum: math.fsum)."""
    values = weights.tolist() if isinstance(weights, torch.Tensor) else weights
    if isinstance(values, (str, bytes)):
        raise ValueError("weights must be a sequence of numbers (sample counts), one per client")
    try:
        w = [float(x) for x in (values if isinstance(values, (list, tuple)) else list(values))]
    except (TypeError, ValueError):
        raise ValueError("weights must be a sequence of numbers (sample counts), one per client") from None
    if len(w) != count:
        raise ValueError(f"got {len(w)} weights for {count} clients: give one weight (sample count) per client")
    if not all(math.isfinite(x) and x >= 0 for x in w):
        raise ValueError("weights must be finite and non-negative sample counts")
    total = math.fsum(w)
    if total <= 0:
        raise ValueError("the total weight is zero: at least one client needs a positive sample count")
    return [x / total for x in w]


def weight_vector(weights, count: int, device) -> torch.Tensor:
    """p_k = n_k / Σ n as a float64 tensor (K,) on `device`."""
    return torch.tensor(normalised_weights(weights, count), dtype=torch.float64, device=device)
