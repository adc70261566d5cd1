"""Packing client and global factors into flat fp32 buffers for the MPI collectives.

Uplink: every rank sends one metadata row per hosted client (float64) and one
fp32 buffer holding, client after client and module after module, B (m×r) then
A (r×n) in C order. Downlink: one int64 rank per module, then B_g and A_g of each
module the same way. Module order is the model's, identical on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from florist_mpi import comm

STATUS_OK, STATUS_FAILED, STATUS_NONFINITE = 0, 1, 2
META_WIDTH = 6  # client id, num_samples, rank, train_loss, status, payload floats
# Why a client that trained is left out of a round (the log's excluded_reason).
REASON_FAILED = "local training failed (see that rank's stderr)"
REASON_NONFINITE = "non-finite factors (NaN/Inf)"


@dataclass
class ClientUpdate:
    """One client's result of a round, as produced by local training."""

    client_id: int
    num_samples: int
    rank: int
    train_loss: float
    # module -> (B_eff m×r, A r×n), float32, LoRA scaling folded into B
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    error: str | None = None


@dataclass
class ReceivedClient:
    client_id: int
    num_samples: int
    rank: int
    train_loss: float
    failed: bool
    factors: dict[str, tuple[np.ndarray, np.ndarray]]


def factor_floats(shapes: dict[str, tuple[int, int]], rank: int) -> int:
    return sum(rank * (m + n) for m, n in shapes.values())


def pack_updates(updates: list[ClientUpdate], shapes: dict[str, tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    rows, pieces = [], []
    for update in updates:
        failed = update.error is not None
        floats = 0 if failed else factor_floats(shapes, update.rank)
        rows.append([update.client_id, update.num_samples, update.rank, update.train_loss,
                     STATUS_FAILED if failed else STATUS_OK, floats])
        if not failed:
            for module in shapes:
                B, A = update.factors[module]
                pieces.extend([B.reshape(-1), A.reshape(-1)])
    meta = np.asarray(rows, dtype=np.float64).reshape(-1, META_WIDTH)
    payload = np.concatenate(pieces).astype(np.float32, copy=False) if pieces else np.empty(0, np.float32)
    return meta, payload


def _unpack_factors(buffer: np.ndarray, shapes, ranks: dict[str, int] | int):
    factors, offset = {}, 0
    for module, (m, n) in shapes.items():
        r = ranks if isinstance(ranks, int) else ranks[module]
        B = buffer[offset : offset + m * r].reshape(m, r)
        offset += m * r
        A = buffer[offset : offset + r * n].reshape(r, n)
        offset += r * n
        factors[module] = (B, A)
    return factors, offset


def gather_updates(world, updates: list[ClientUpdate], shapes) -> list[ReceivedClient] | None:
    """Rank 0 receives every client's update, ordered by client id; None elsewhere."""
    meta, payload = pack_updates(updates, shapes)
    rows_per_rank = comm.gather_counts(world, len(updates))
    all_meta = comm.gather_rows(world, meta)
    buffers = comm.gather_float32(world, payload)
    if not world.is_root:
        return None
    received, row = [], 0
    for rank_buffer, count in zip(buffers, rows_per_rank):
        offset = 0
        for client_id, num_samples, lora_rank, loss, status, floats in all_meta[row : row + int(count)]:
            floats = int(floats)
            factors = {}
            if int(status) == STATUS_OK:
                factors, used = _unpack_factors(rank_buffer[offset : offset + floats], shapes, int(lora_rank))
                if used != floats:
                    raise RuntimeError("uplink payload size disagrees with its metadata")
            offset += floats
            received.append(ReceivedClient(int(client_id), int(num_samples), int(lora_rank), float(loss),
                                           int(status) != STATUS_OK, factors))
        row += int(count)
    return sorted(received, key=lambda c: c.client_id)


def broadcast_global(world, global_factors: dict[str, tuple[np.ndarray, np.ndarray]] | None, shapes):
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
