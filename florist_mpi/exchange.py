"""Packing client and global factors into flat fp32 buffers for the MPI collectives (root mode).

Uplink. Every rank checks its clients' factors itself (a failed training, NaN/Inf) and sends one
metadata row per hosted client (float64: id, n_k, r_k, train loss, status, floats sent) and one
fp32 buffer holding, module after module in model order, the stacked factors of its clients that
passed: Bᵀ of every client (r_k rows of m), then A of every client (r_k rows of n), clients in the
rank's order. Rank 0 puts each module's rows of all ranks in client-id order, whatever the ranks'
layout, so that a module arrives as two arrays, Bᵀ_s (R×m) and A_s (R×n), R = Σ r_k: the stacks
the aggregation works on (`ClientStacks.stack`), with one copy of the payload and no per-client
Python work.

Downlink: one int64 rank per module, then B_g and A_g of each module, C order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from florist_mpi import comm

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

    def client_factors(self, module: str) -> dict[int, Pair]:
        """client id -> (B m×r_k, A r_k×n) views of one module (B is a transposed view of Bᵀ's rows)."""
        Bt, A = self.modules[module]
        return {
            c.client_id: (Bt[lo : lo + c.rank].T, A[lo : lo + c.rank])
            for c, lo in zip(self.clients, self.offsets.tolist())
        }


# ------------------------------------------------------------------------ one rank


def _rows_finite(rows: np.ndarray) -> np.ndarray:
    return np.isfinite(rows).all(axis=1) if rows.size else np.ones(rows.shape[0], dtype=bool)


def pack_updates(updates: list[ClientUpdate], shapes: Shapes) -> tuple[np.ndarray, np.ndarray]:
    """(metadata rows, payload) of a rank's clients; see the module docstring."""
    trained = [u for u in updates if u.error is None]
    payload, finite = _stack_rank(trained, shapes)
    if not finite.all():  # rare: drop the clients with NaN/Inf rows and pack the rest again
        trained = [u for u, ok in zip(trained, finite) if ok]
        payload, _ = _stack_rank(trained, shapes)
    ok = {id(u) for u in trained}
    rows = []
    for update in updates:
        status = STATUS_OK if id(update) in ok else STATUS_FAILED if update.error is not None else STATUS_NONFINITE
        floats = factor_floats(shapes, update.rank) if status == STATUS_OK else 0
        rows.append([update.client_id, update.num_samples, update.rank, update.train_loss, status, floats])
    return np.asarray(rows, dtype=np.float64).reshape(-1, META_WIDTH), payload


def _stack_rank(trained: list[ClientUpdate], shapes: Shapes) -> tuple[np.ndarray, np.ndarray]:
    """(payload, per-client finiteness): module by module, Bᵀ of every client then A of every client."""
    ranks = np.array([u.rank for u in trained], dtype=np.int64)
    R = int(ranks.sum())
    payload = np.empty(R * sum(m + n for m, n in shapes.values()), dtype=np.float32)
    finite_rows = np.ones(R, dtype=bool)
    offset = 0
    for name, (m, n) in shapes.items():
        Bt = payload[offset : offset + R * m].reshape(R, m)
        A = payload[offset + R * m : offset + R * (m + n)].reshape(R, n)
        offset += R * (m + n)
        if trained:  # one C-level copy per stack (B_kᵀ are views)
            np.concatenate([u.factors[name][0].T for u in trained], axis=0, out=Bt)
            np.concatenate([u.factors[name][1] for u in trained], axis=0, out=A)
            finite_rows &= _rows_finite(Bt) & _rows_finite(A)
    if not trained:
        return payload, np.ones(0, dtype=bool)
    starts = np.cumsum(ranks) - ranks
    finite = np.array([finite_rows[s : s + r].all() for s, r in zip(starts.tolist(), ranks.tolist())], dtype=bool) \
        if (ranks == 0).any() else np.logical_and.reduceat(finite_rows, starts)
    return payload, finite


# ------------------------------------------------------------------------ rank 0


def received_clients(rows: np.ndarray) -> list[ReceivedClient]:
    """One ReceivedClient per metadata row, in row order."""
    return [
        ReceivedClient(int(client_id), int(samples), int(rank), float(loss), int(status))
        for client_id, samples, rank, loss, status, _ in rows
    ]


def _id_order_rows(clients: list[ReceivedClient]) -> np.ndarray | None:
    """For stacked rows laid out rank after rank, where each row goes in client-id order (None: it
    already is in that order)."""
    ids = np.array([c.client_id for c in clients], dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    if (order == np.arange(len(order))).all():
        return None
    ranks = np.array([c.rank for c in clients], dtype=np.int64)
    source_start = np.cumsum(ranks) - ranks  # each client's first row as laid out
    sorted_ranks = ranks[order]
    target_start = np.cumsum(sorted_ranks) - sorted_ranks  # ... and in id order
    target_of_client = np.empty_like(target_start)
    target_of_client[order] = target_start
    # row j of client k (as laid out) goes to target_of_client[k] + j
    return np.repeat(target_of_client - source_start, ranks) + np.arange(int(ranks.sum()))


def stack_clients(buffers: list[np.ndarray], metas: list[np.ndarray], shapes: Shapes) -> ClientStacks:
    """Rank 0: every module's stack in client-id order from the ranks' payloads (one copy)."""
    per_rank = [[c for c in received_clients(rows) if c.status == STATUS_OK] for rows in metas]
    laid_out = [c for clients in per_rank for c in clients]
    widths = [sum(c.rank for c in clients) for clients in per_rank]
    R = sum(widths)
    target = _id_order_rows(laid_out)
    modules, offsets = {}, [0] * len(buffers)
    for name, (m, n) in shapes.items():
        stacks = []
        for width, cols in ((m, "B"), (n, "A")):
            out = np.empty((R, width), dtype=np.float32)
            row = 0
            for rank, (buffer, w) in enumerate(zip(buffers, widths)):
                start = offsets[rank] + (0 if cols == "B" else w * m)
                part = buffer[start : start + w * width].reshape(w, width)
                if target is None:
                    out[row : row + w] = part
                else:
                    out[target[row : row + w]] = part
                row += w
            stacks.append(out)
        for rank, w in enumerate(widths):
            offsets[rank] += w * (m + n)
        modules[name] = (stacks[0], stacks[1])
    return ClientStacks(clients=sorted(laid_out, key=lambda c: c.client_id), modules=modules)


def gather_updates(world, updates: list[ClientUpdate], shapes: Shapes):
    """Rank 0: (every client that trained, by id; the stacks of those that passed); None elsewhere."""
    meta, payload = pack_updates(updates, shapes)
    rows_per_rank = comm.gather_counts(world, len(updates))
    all_meta = comm.gather_rows(world, meta)
    buffers = comm.gather_float32(world, payload)
    if not world.is_root:
        return None
    metas = np.split(all_meta, np.cumsum(rows_per_rank)[:-1])
    for rows, buffer in zip(metas, buffers):
        if int(rows[:, 5].sum()) != buffer.size:
            raise RuntimeError("uplink payload size disagrees with its metadata")
    received = sorted(received_clients(all_meta), key=lambda c: c.client_id)
    return received, stack_clients(buffers, metas, shapes)


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
