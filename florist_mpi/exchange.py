"""Packing client and global factors into flat fp32 buffers for the MPI collectives (root mode).

Uplink. Every rank checks its clients' factors itself (a failed training, NaN/Inf) and sends one
metadata row per hosted client (float64: id, n_k, r_k, train loss, status, floats sent); then, module
after module in model order, the stacked factors of its clients that passed: Bᵀ of every client
(r_k rows of m), then A of every client (r_k rows of n), clients in the rank's order. Rank 0 receives
each stack of all ranks into one buffer and takes its rows into client-id order, whatever the ranks'
layout, so that a module arrives as two arrays, Bᵀ_s (R×m) and A_s (R×n), R = Σ r_k: the stacks the
aggregation works on, with one copy after the receive and no per-client Python work.

Downlink: one int64 rank per module, then B_g and A_g of each module, C order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from florist_mpi import comm
from florist_mpi.clientstack import ClientStack

STATUS_OK, STATUS_FAILED, STATUS_NONFINITE = 0, 1, 2
META_WIDTH = 6  # client id, num_samples, rank, train_loss, status, payload floats
# Why a client that trained is left out of a round (the log's excluded_reason).
REASON_FAILED = "local training failed (see that rank's stderr)"
REASON_NONFINITE = "non-finite factors (NaN/Inf)"
REASONS = {STATUS_FAILED: REASON_FAILED, STATUS_NONFINITE: REASON_NONFINITE}

Shapes = dict[str, tuple[int, int]]
Pair = tuple[np.ndarray, np.ndarray]


@dataclass
class ClientUpdate:
    """One client's result of a round, as produced by local training."""

    client_id: int
    num_samples: int
    rank: int
    train_loss: float
    # module -> (B_eff m×r, A r×n), float32, LoRA scaling folded into B
    factors: dict[str, Pair] = field(default_factory=dict)
    error: str | None = None


@dataclass
class ReceivedClient:
    """What every rank learns of a client that trained (its factors travel apart, stacked)."""

    client_id: int
    num_samples: int
    rank: int
    train_loss: float
    status: int = STATUS_OK

    @property
    def failed(self) -> bool:
        return self.status == STATUS_FAILED


def factor_floats(shapes: Shapes, rank: int) -> int:
    return sum(rank * (m + n) for m, n in shapes.values())


@dataclass
class ClientStacks:
    """Every module's factors of the clients that passed their checks, stacked in client-id order.

    modules[name] = (Bᵀ_s R×m, A_s R×n) float32; client k's rows are offsets[k] … offsets[k] + r_k − 1.
    """

    clients: list[ReceivedClient]  # ascending ids, status OK
    modules: dict[str, Pair]

    @cached_property
    def ranks(self) -> np.ndarray:
        return np.array([c.rank for c in self.clients], dtype=np.int64)

    @cached_property
    def offsets(self) -> np.ndarray:
        return np.cumsum(self.ranks) - self.ranks

    def client_stacks(self) -> dict[str, ClientStack]:
        """Every module as the aggregation's ClientStack: B_s is the transposed view of the received
        Bᵀ_s buffer and A_s the buffer itself; nothing is copied or split per client."""
        ranks = torch.from_numpy(self.ranks)
        return {
            name: ClientStack(torch.from_numpy(Bt).T, torch.from_numpy(A), ranks)
            for name, (Bt, A) in self.modules.items()
        }

    def client_factors(self, module: str) -> dict[int, Pair]:
        """client id -> (B m×r_k, A r_k×n) views of one module (B is a transposed view of Bᵀ's rows)."""
        Bt, A = self.modules[module]
        return {
            c.client_id: (Bt[lo : lo + c.rank].T, A[lo : lo + c.rank])
            for c, lo in zip(self.clients, self.offsets.tolist())
        }


# ------------------------------------------------------------------------ one rank


def _rows_finite(rows: np.ndarray) -> np.ndarray:
    """Per row: all finite. A float64 sum is NaN/Inf exactly when a float32 element is (it cannot
    overflow), and costs a fifth of an elementwise test."""
    return np.isfinite(rows.sum(axis=1, dtype=np.float64))


def stack_rank(trained: list[ClientUpdate], shapes: Shapes) -> tuple[dict[str, Pair], np.ndarray]:
    """(module -> (Bᵀ rows R×m, A rows R×n) of a rank's clients in their order, per-client finiteness).

    One C-level copy per stack: B_kᵀ are views, contiguous ones as training stores B (column-major).
    """
    ranks = np.array([u.rank for u in trained], dtype=np.int64)
    R = int(ranks.sum())
    finite_rows = np.ones(R, dtype=bool)
    stacks = {}
    for name, (m, n) in shapes.items():
        Bt, A = np.empty((R, m), dtype=np.float32), np.empty((R, n), dtype=np.float32)
        if trained:
            np.concatenate([u.factors[name][0].T for u in trained], axis=0, out=Bt)
            np.concatenate([u.factors[name][1] for u in trained], axis=0, out=A)
            finite_rows &= _rows_finite(Bt) & _rows_finite(A)
        stacks[name] = (Bt, A)
    starts = np.cumsum(ranks) - ranks
    if (ranks == 0).any():  # reduceat cannot take empty segments
        finite = np.array([finite_rows[s : s + r].all() for s, r in zip(starts.tolist(), ranks.tolist())], bool)
    else:
        finite = np.logical_and.reduceat(finite_rows, starts) if trained else np.ones(0, dtype=bool)
    return stacks, finite


def pack_updates(updates: list[ClientUpdate], shapes: Shapes) -> tuple[np.ndarray, dict[str, Pair]]:
    """(metadata rows, module -> stacked rows of the clients that passed) of a rank's clients: a
    failed training or a NaN/Inf factor keeps a client's rows out (its status says why)."""
    trained = [u for u in updates if u.error is None]
    stacks, finite = stack_rank(trained, shapes)
    if not finite.all():  # rare: stack the finite clients again
        trained = [u for u, ok in zip(trained, finite) if ok]
        stacks, _ = stack_rank(trained, shapes)
    ok = {id(u) for u in trained}
    rows = []
    for update in updates:
        status = STATUS_OK if id(update) in ok else STATUS_FAILED if update.error is not None else STATUS_NONFINITE
        floats = factor_floats(shapes, update.rank) if status == STATUS_OK else 0
        rows.append([update.client_id, update.num_samples, update.rank, update.train_loss, status, floats])
    return np.asarray(rows, dtype=np.float64).reshape(-1, META_WIDTH), stacks


# ------------------------------------------------------------------------ rank 0


def received_clients(rows: np.ndarray) -> list[ReceivedClient]:
    """One ReceivedClient per metadata row, in row order."""
    return [
        ReceivedClient(int(client_id), int(samples), int(rank), float(loss), int(status))
        for client_id, samples, rank, loss, status, _ in rows
    ]


def _id_order_rows(clients: list[ReceivedClient]) -> np.ndarray | None:
    """The stacked rows, laid out rank after rank, in client-id order: out = laid_out[rows] (None: they
    already are in that order)."""
    ids = np.array([c.client_id for c in clients], dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    if (order == np.arange(len(order))).all():
        return None
    ranks = np.array([c.rank for c in clients], dtype=np.int64)
    source_start = np.cumsum(ranks) - ranks  # each client's first row as laid out
    sorted_ranks = ranks[order]
    target_start = np.cumsum(sorted_ranks) - sorted_ranks  # ... and in id order
    # target row target_start[i] + j comes from source row source_start[order[i]] + j
    return np.repeat(source_start[order] - target_start, sorted_ranks) + np.arange(int(ranks.sum()))


def gather_updates(world, updates: list[ClientUpdate], shapes: Shapes):
    """Rank 0: (every client that trained, by id; the stacks of those that passed); None elsewhere.

    The metadata first, then each module's Bᵀ and A rows gathered straight into one buffer in rank
    order; rank 0 then takes the rows into client-id order (one copy, none when already in order).
    """
    meta, stacks = pack_updates(updates, shapes)
    rows_per_rank = comm.gather_counts(world, len(updates))
    all_meta = comm.gather_rows(world, meta)
    received = laid_out = rows = None
    if world.is_root:
        metas = np.split(all_meta, np.cumsum(rows_per_rank)[:-1])
        laid_out = [c for part in metas for c in received_clients(part) if c.status == STATUS_OK]
        rows = _id_order_rows(laid_out)
        received = sorted(received_clients(all_meta), key=lambda c: c.client_id)
    modules = {}
    for name, (m, n) in shapes.items():
        pair = []
        for local, width in zip(stacks[name], (m, n)):
            gathered = comm.gather_float32_concat(world, local.reshape(-1))
            if world.is_root:
                everything = gathered[0].reshape(-1, width)
                pair.append(everything if rows is None else np.take(everything, rows, axis=0))
        if world.is_root:
            modules[name] = (pair[0], pair[1])
        del stacks[name]  # this rank's copy has been sent
    if not world.is_root:
        return None
    width = sum(c.rank for c in laid_out)
    if any(Bt.shape[0] != width for Bt, _ in modules.values()):
        raise RuntimeError("uplink payload size disagrees with its metadata")
    return received, ClientStacks(clients=sorted(laid_out, key=lambda c: c.client_id), modules=modules)


# ------------------------------------------------------------------------ downlink


def _unpack_factors(buffer: np.ndarray, shapes, ranks: dict[str, int]):
    factors, offset = {}, 0
    for module, (m, n) in shapes.items():
        r = ranks[module]
        B = buffer[offset : offset + m * r].reshape(m, r)
        offset += m * r
        A = buffer[offset : offset + r * n].reshape(r, n)
        offset += r * n
        factors[module] = (B, A)
    return factors, offset


def residual_pair(result) -> tuple[np.ndarray, np.ndarray]:
    """A result's residual factors as contiguous fp32 arrays (rank 0 when the result has none)."""
    m, n = result.B.shape[0], result.A.shape[1]
    if result.residual is None:
        return np.zeros((m, 0), np.float32), np.zeros((0, n), np.float32)
    left, right = result.residual
    return left.float().contiguous().cpu().numpy(), right.float().contiguous().cpu().numpy()


def broadcast_global(world, global_factors: dict[str, Pair] | None, shapes):
    """Every rank gets rank 0's global factors (module -> (B, A), float32)."""
    names = list(shapes)
    ranks = np.zeros(len(names), dtype=np.int64)
    if world.is_root:
        ranks[:] = [global_factors[name][0].shape[1] for name in names]
    if world.size > 1:
        comm.bcast_array(world, ranks)
    payload = None
    if world.is_root:
        payload = np.concatenate(
            [np.concatenate([global_factors[n][0].reshape(-1), global_factors[n][1].reshape(-1)]) for n in names]
        ).astype(np.float32, copy=False)
    if world.size > 1:
        payload = comm.bcast_float32(world, payload)
    factors, _ = _unpack_factors(payload, shapes, dict(zip(names, (int(r) for r in ranks))))
    return {name: (np.ascontiguousarray(B), np.ascontiguousarray(A)) for name, (B, A) in factors.items()}
