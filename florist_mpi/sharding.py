"""Sharded aggregation (federation.aggregation: sharded): every adapted module has an owner rank.

A round, every step a collective over all ranks:
1. Metadata. Each rank checks its own clients' factors for NaN/Inf and all-gathers one row
   per client (id, samples, rank, loss, status): every rank learns every client and the
   same exclusion verdict root mode reaches (same clients, same reasons).
2. Owners. Modules go to ranks by greedy longest-processing-time on their estimated
   aggregation cost (`Method.aggregation_cost` from m, n, K and R, the method's one cost plan;
   no global rank is known yet, so the final products are priced at r_g = min(R, m, n)): the
   same on every rank.
3. Scatter. Each rank sends each kept client's factors of module M to M's owner (all-to-all
   in int-safe steps). An owner holds its modules' factors of every kept client; no rank
   holds every module's factors of every client.
4. Aggregate. Owners aggregate their modules, in parallel across ranks, with the same
   `aggregate_adapter` call (same clients, same order, same weights) as root mode.
5. All-gather. Every rank receives every module's global factors, rank, energy and spectrum (and
   residual factors, FedEx-LoRA).
6. Log (log.client_adapters only). Rank 0 receives the client adapters from their owners
   one module at a time, while the round is written (`stream_client_adapters`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from florist_mpi import comm
from florist_mpi.aggregation import AggregationResult, aggregate_adapter, aggregation_cost
from florist_mpi.exchange import (
    META_WIDTH,
    REASON_FAILED,
    REASON_NONFINITE,
    STATUS_FAILED,
    STATUS_NONFINITE,
    STATUS_OK,
    ClientUpdate,
    ReceivedClient,
    factor_floats,
    residual_pair,
)

Pair = tuple[np.ndarray, np.ndarray]


@dataclass
class ShardedRound:
    """One round's sharded exchange and aggregation, as seen from one rank."""

    clients: list[ReceivedClient]  # every client that trained this round, by id (no factors)
    kept: list[ReceivedClient]  # the clients aggregated, by id
    excluded: list[tuple[int, str]]  # (client id, reason), sorted; dropouts included
    owners: dict[str, int] = field(default_factory=dict)  # module -> owner rank
    owned: dict[str, list[Pair]] = field(default_factory=dict)  # this rank's modules: kept clients' (B, A)
    results: dict[str, AggregationResult] = field(default_factory=dict)  # every module (global B, A as tensors)
    global_factors: dict[str, Pair] = field(default_factory=dict)  # every module, float32
    residuals: dict[str, Pair] = field(default_factory=dict)  # every module's residual, float32 (FedEx-LoRA)
    time_scatter: float = 0.0
    time_aggregate: float = 0.0  # this rank's own aggregation work
    time_allgather: float = 0.0


# ------------------------------------------------------------------ owners


def assign_owners(costs: dict[str, float], size: int) -> dict[str, int]:
    """Greedy longest-processing-time: costliest module first, each to the least-loaded rank.

    Ties go to the earlier module (model order) and the lower rank, so every rank computes
    the same assignment from the same costs. The largest load is at most 4/3 of the best
    possible (Graham's bound).
    """
    names = list(costs)
    loads = [0.0] * size
    owners: dict[str, int] = {}
    for index in sorted(range(len(names)), key=lambda i: (-costs[names[i]], i)):
        rank = min(range(size), key=lambda r: (loads[r], r))
        owners[names[index]] = rank
        loads[rank] += costs[names[index]]
    return {name: owners[name] for name in names}


def module_costs(method: str, shapes: dict[str, tuple[int, int]], ranks: list[int]) -> dict[str, float]:
    """Estimated aggregation FLOPs of each module for the kept clients' LoRA ranks: the method's one
    cost plan (florist_mpi.costmodel), with the final products priced at r_g = min(R, m, n)."""
    total, widest = sum(ranks), max(ranks)
    return {name: aggregation_cost(method, m, n, len(ranks), total, widest) for name, (m, n) in shapes.items()}


# ------------------------------------------------------------------ metadata


def _status(update: ClientUpdate) -> int:
    if update.error is not None:
        return STATUS_FAILED
    finite = all(np.isfinite(B).all() and np.isfinite(A).all() for B, A in update.factors.values())
    return STATUS_OK if finite else STATUS_NONFINITE


def client_rows(updates: list[ClientUpdate], shapes) -> np.ndarray:
    """One metadata row per hosted client; only clients with status OK send factors."""
    rows = []
    for update in updates:
        status = _status(update)
        floats = factor_floats(shapes, update.rank) if status == STATUS_OK else 0
        rows.append([update.client_id, update.num_samples, update.rank, update.train_loss, status, floats])
    return np.asarray(rows, dtype=np.float64).reshape(-1, META_WIDTH)


def exchange_metadata(world, updates: list[ClientUpdate], shapes, dropped: list[tuple[int, str]]):
    """Every rank's view of the round: (clients, kept, excluded, host rank of each client id)."""
    rows, counts = comm.allgather_rows(world, client_rows(updates, shapes))
    hosts = np.repeat(np.arange(world.size), counts)
    clients, host_of, excluded = [], {}, list(dropped)
    for (client_id, samples, rank, loss, status, _), host in zip(rows, hosts):
        client = ReceivedClient(int(client_id), int(samples), int(rank), float(loss), int(status))
        clients.append(client)
        host_of[client.client_id] = int(host)
        if int(status) == STATUS_FAILED:
            excluded.append((client.client_id, REASON_FAILED))
        elif int(status) == STATUS_NONFINITE:
            excluded.append((client.client_id, REASON_NONFINITE))
    clients.sort(key=lambda c: c.client_id)
    out = {cid for cid, _ in excluded}
    kept = [c for c in clients if c.client_id not in out]
    return clients, kept, sorted(excluded), host_of


# ------------------------------------------------------------------ scatter


def scatter_to_owners(world, updates: list[ClientUpdate], shapes, owners: dict[str, int], kept: list[ReceivedClient],
                      host_of: dict[int, int]) -> dict[str, list[Pair]]:
    """Each owner receives its modules' factors of every kept client: module -> [(B, A)] by client id.

    Sender and receiver walk the same order: a host's kept clients by id, and for each
    client the destination's modules in model order, B then A (C order, fp32).
    """
    mine = {update.client_id: update for update in updates}
    by_host: list[list[ReceivedClient]] = [[] for _ in range(world.size)]
    for client in kept:  # kept is sorted by id
        by_host[host_of[client.client_id]].append(client)
    owned = [name for name in shapes if owners[name] == world.rank]

    outgoing: list[list[np.ndarray]] = [[] for _ in range(world.size)]
    for client in by_host[world.rank]:
        factors = mine[client.client_id].factors
        for name in shapes:
            B, A = factors[name]
            outgoing[owners[name]].extend([np.ascontiguousarray(B, np.float32).reshape(-1),
                                           np.ascontiguousarray(A, np.float32).reshape(-1)])
    incoming = [
        np.empty(sum(c.rank * (shapes[name][0] + shapes[name][1]) for c in clients for name in owned), np.float32)
        for clients in by_host
    ]
    comm.alltoallv_float32(world, outgoing, incoming)

    received: dict[str, dict[int, Pair]] = {name: {} for name in owned}
    for buffer, clients in zip(incoming, by_host):
        offset = 0
        for client in clients:
            for name in owned:
                (m, n), r = shapes[name], client.rank
                B = buffer[offset : offset + m * r].reshape(m, r)
                A = buffer[offset + m * r : offset + r * (m + n)].reshape(r, n)
                offset += r * (m + n)
                received[name][client.client_id] = (B, A)
    return {name: [received[name][c.client_id] for c in kept] for name in owned}


# ------------------------------------------------------------------ all-gather of the results


def allgather_results(world, shapes, owners: dict[str, int], results: dict[str, AggregationResult], method: str):
    """Every rank gets every module's (B, A) in float32, its AggregationResult (rank, energy, spectrum, residual)
    and its residual factors (module -> fp32 m×q, q×n; rank 0 unless the method folds one, FedEx-LoRA)."""
    owned = [name for name in shapes if owners[name] == world.rank]
    summary, payload = [], []
    for name in owned:
        result = results[name]
        spectrum = result.singular_values.double().cpu().numpy().reshape(-1)
        left, right = residual_pair(result)  # rank 0 unless the method folds a residual (FedEx-LoRA)
        summary.extend([float(result.rank), float(result.energy), float(spectrum.size), *spectrum.tolist(),
                        float(left.shape[1])])
        payload.extend(
            [
                result.B.float().contiguous().cpu().numpy().reshape(-1),
                result.A.float().contiguous().cpu().numpy().reshape(-1),
                left.reshape(-1),
                right.reshape(-1),
            ]
        )
    rows, counts = comm.allgather_rows(world, np.asarray(summary, dtype=np.float64).reshape(-1, 1))
    summaries = np.split(rows.reshape(-1), np.cumsum(counts)[:-1])
    buffers = comm.allgatherv_float32(world, np.concatenate(payload) if payload else np.empty(0, np.float32))

    global_factors, residuals, gathered = {}, {}, {}
    for rank, (values, buffer) in enumerate(zip(summaries, buffers)):
        at, offset = 0, 0
        for name in (n for n in shapes if owners[n] == rank):
            r, energy, length = int(values[at]), float(values[at + 1]), int(values[at + 2])
            spectrum = values[at + 3 : at + 3 + length].copy()
            q = int(values[at + 3 + length])
            at += 4 + length
            m, n = shapes[name]
            B = buffer[offset : offset + m * r].reshape(m, r)
            A = buffer[offset + m * r : offset + r * (m + n)].reshape(r, n)
            offset += r * (m + n)
            left = buffer[offset : offset + m * q].reshape(m, q)
            right = buffer[offset + m * q : offset + q * (m + n)].reshape(q, n)
            offset += q * (m + n)
            global_factors[name], residuals[name] = (B, A), (left, right)
            gathered[name] = AggregationResult(
                torch.from_numpy(B), torch.from_numpy(A), r, torch.from_numpy(spectrum), energy, method=method,
                residual=(torch.from_numpy(left), torch.from_numpy(right)) if q else None,
            )
    return ({name: global_factors[name] for name in shapes}, {name: gathered[name] for name in shapes},
            {name: residuals[name] for name in shapes})


# ------------------------------------------------------------------ the round


def sharded_round(
    world,
    updates: list[ClientUpdate],
    shapes,
    dropped: list[tuple[int, str]],
    *,
    method: str,
    tau: float,
    max_rank: int | None,
    before_aggregate: Callable[[], None] | None = None,
) -> ShardedRound:
    """Steps 1–5 of the module docstring. With no client left, returns before any factor moves
    (`kept` empty): every rank reaches that verdict from the same metadata."""
    clients, kept, excluded, host_of = exchange_metadata(world, updates, shapes, dropped)
    state = ShardedRound(clients=clients, kept=kept, excluded=excluded)
    if before_aggregate is not None:
        before_aggregate()
    if not kept:
        return state
    state.owners = assign_owners(module_costs(method, shapes, [c.rank for c in kept]), world.size)

    start = time.perf_counter()
    state.owned = scatter_to_owners(world, updates, shapes, state.owners, kept, host_of)
    state.time_scatter = time.perf_counter() - start

    start = time.perf_counter()
    per_module = {
        name: [(torch.from_numpy(B), torch.from_numpy(A)) for B, A in pairs] for name, pairs in state.owned.items()
    }
    results = aggregate_adapter(method, per_module, [c.num_samples for c in kept], tau=tau, max_rank=max_rank)
    state.time_aggregate = time.perf_counter() - start

    start = time.perf_counter()
    state.global_factors, state.results, state.residuals = allgather_results(
        world, shapes, state.owners, results, method)
    state.time_allgather = time.perf_counter() - start
    return state


# ------------------------------------------------------------------ client adapters for the log


def _module_pieces(state: ShardedRound, name: str) -> list[np.ndarray]:
    return [array.reshape(-1) for B, A in state.owned[name] for array in (B, A)]


def stream_client_adapters(world, state: ShardedRound, shapes) -> Iterator[tuple[str, dict[int, Pair]]]:
    """Rank 0: (module, {client id: (B, A)}) for every module in model order, one at a time.

    Modules rank 0 owns come from memory; the others are received from their owners as the
    iterator advances (each owner runs `send_client_adapters` meanwhile), so rank 0 holds
    one foreign module's client factors at a time.
    """
    ids = [c.client_id for c in state.kept]
    for name, (m, n) in shapes.items():
        owner = state.owners[name]
        if owner == world.rank:
            yield name, dict(zip(ids, state.owned[name]))
            continue
        buffer = comm.recv_float32(world, np.empty(sum(c.rank * (m + n) for c in state.kept), np.float32), owner)
        pairs, offset = {}, 0
        for client in state.kept:
            r = client.rank
            pairs[client.client_id] = (
                buffer[offset : offset + m * r].reshape(m, r),
                buffer[offset + m * r : offset + r * (m + n)].reshape(r, n),
            )
            offset += r * (m + n)
        yield name, pairs


def send_client_adapters(world, state: ShardedRound, shapes) -> None:
    """Every rank but 0: send the client factors of the modules it owns to rank 0, in model order."""
    for name in shapes:
        if state.owners.get(name) == world.rank:
            comm.send_float32(world, _module_pieces(state, name), dest=0)
