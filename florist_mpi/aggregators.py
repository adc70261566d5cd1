"""How a round's client updates become one global adapter on every rank.

The round loop (federation.py) hands an `Aggregation` the updates this rank trained and the
clients already left out (dropouts, stragglers); it gets back a `RoundOutcome`, knowing nothing
of the exchange behind it, as Flower's server loop calls `strategy.aggregate_fit`. Two
strategies, chosen by `federation.aggregation`:

- `RootAggregation` (root): rank 0 gathers every client's factors, aggregates every module and
  broadcasts the global factors (exchange.py).
- `ShardedAggregation` (sharded): every module has an owner rank that receives that module's
  client factors, aggregates it, and all ranks all-gather the results (sharding.py).

Each strategy also owns how the round's client adapters reach the log (`publish`): root mode
already holds them on rank 0; in sharded mode rank 0 receives them from their owners one module
at a time while it writes the round.

Which method aggregates (FLoRIST or a baseline) is the method's business (florist_mpi.methods);
a strategy only decides where the work runs and how the factors travel.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from florist_mpi import comm, exchange, methods, sharding
from florist_mpi.config import FederationConfig
from florist_mpi.errors import RoundFailed
from florist_mpi.exchange import ClientUpdate, ReceivedClient
from florist_mpi.lowrank import AggregationResult

DROPOUT_REASON = "dropout (simulated, federation.dropout)"

Shapes = dict[str, tuple[int, int]]
GlobalFactors = dict[str, tuple[np.ndarray, np.ndarray]]  # module -> fp32 (B m×r_g, A r_g×n)
ClientModules = Iterator[tuple[str, dict[int, tuple[np.ndarray, np.ndarray]]]]  # see storage.RoundRecord


@dataclass
class RoundOutcome:
    """What the aggregation of one round decided.

    `global_factors` is every rank's; the client lists, exclusions and results are rank 0's in
    root mode (empty elsewhere) and every rank's in sharded mode.
    """

    received: list[ReceivedClient]  # every client that trained this round (failed ones included)
    kept: list[ReceivedClient]  # the clients aggregated
    excluded: list[tuple[int, str]]  # (client id, reason), sorted
    results: dict[str, AggregationResult] = field(default_factory=dict)  # module -> the method's result
    global_factors: GlobalFactors = field(default_factory=dict)
    # every rank's: module -> fp32 residual factors (m×q, q×n) merged into the base (FedEx-LoRA); else empty
    residuals: GlobalFactors = field(default_factory=dict)
    # seconds of the aggregation itself on rank 0 (root mode); None in sharded mode, where every owner
    # times its own share and the round's phase timings already take the slowest rank's
    time_aggregate: float | None = None
    error: str | None = None  # root mode, rank 0: why the round cannot be aggregated (no client left)
    sharded: sharding.ShardedRound | None = None  # sharded mode: the owners' state, for the client adapters
    stacks: exchange.ClientStacks | None = None  # root mode, rank 0: the kept clients' stacked factors

    @property
    def empty(self) -> bool:
        """No client was aggregated (federation.empty_round: skip): no global update this round."""
        return not self.global_factors


def no_client_left(round_index: int, excluded: list[tuple[int, str]]) -> str:
    """One line: the round and why its clients were left out, grouped by the kind of reason (the text
    before its first colon), with the first client's details, e.g.
    "clients 0, 1, 2: straggler (client 0: simulated 6.51s exceeds system.deadline_s 1s)"."""
    by_kind: dict[str, list[tuple[int, str]]] = {}
    for client, why in sorted(excluded):
        by_kind.setdefault(why.split(":")[0], []).append((client, why))
    parts = []
    for kind, members in by_kind.items():
        first, why = members[0]
        detail = why[len(kind) + 1:].strip()
        example = f" (client {first}: {detail})" if detail else ""
        parts.append(f"{_clients([c for c, _ in members])}: {kind}{example}")
    return f"round {round_index} has no client left to aggregate ({'; '.join(parts) or 'no client was sampled'})"


def _clients(ids: list[int], shown: int = 8) -> str:
    listed = ", ".join(str(c) for c in ids[:shown]) + (f" and {len(ids) - shown} more" if len(ids) > shown else "")
    return f"client{'s' if len(ids) > 1 else ''} {listed}"


class Aggregation(ABC):
    """One round's exchange and aggregation, behind one call; see the module docstring."""

    def __init__(self, world, federation: FederationConfig, shapes: Shapes, log_client_adapters: bool,
                 kill_point: Callable[[str, int], None]):
        self.world, self.federation, self.shapes = world, federation, shapes
        self.method = methods.get(federation.method)
        self.log_client_adapters = log_client_adapters
        self.kill_point = kill_point  # test hook (docs/fault-injection.md)

    def _nobody_aggregated(self, message: str) -> None:
        """A round without a client to aggregate (every rank reached the same verdict): RoundFailed
        under federation.empty_round: fail; otherwise the strategy returns an empty outcome."""
        if self.federation.empty_round == "fail":
            raise RoundFailed(message)

    @abstractmethod
    def aggregate(self, round_index: int, updates: list[ClientUpdate], left_out: list[tuple[int, str]],
                  timings: dict[str, float]) -> RoundOutcome:
        """Called on every rank with the updates it trained and the clients left out before training
        (client id, reason). Fills timings' time_gather, time_aggregate and time_broadcast."""

    @abstractmethod
    def publish(self, outcome: RoundOutcome, commit: Callable[[ClientModules | None], None]) -> None:
        """Called on every rank once the round is ready to log: rank 0 calls `commit` with the round's
        client adapters (None when not logged); the other ranks do their part of getting them there."""


def exclusions(received: list[ReceivedClient], left_out: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The left-out clients plus those whose rank rejected them (failed training, NaN/Inf factors), sorted."""
    rejected = [(c.client_id, exchange.REASONS[c.status]) for c in received if c.status != exchange.STATUS_OK]
    return sorted(list(left_out) + rejected)


class RootAggregation(Aggregation):
    """federation.aggregation: root. Rank 0 gathers every client, aggregates, broadcasts."""

    def aggregate(self, round_index, updates, left_out, timings):
        world = self.world
        start = time.perf_counter()
        gathered = exchange.gather_updates(world, updates, self.shapes)
        timings["time_gather"] = time.perf_counter() - start

        start = time.perf_counter()
        outcome = self._aggregate_at_root(round_index, *gathered, left_out) if world.is_root else None
        failure = comm.root_verdict(world, outcome.error if world.is_root else None)
        timings["time_aggregate"] = time.perf_counter() - start
        if failure:  # no client left: every rank learned it from rank 0
            self._nobody_aggregated(failure)
            timings["time_broadcast"] = 0.0
            return outcome if outcome is not None else RoundOutcome(received=[], kept=[], excluded=[])

        start = time.perf_counter()
        root_factors = outcome.global_factors if world.is_root else None
        global_factors = exchange.broadcast_global(world, root_factors, self.shapes)
        residuals = {}
        if self.method.folds_residual:  # the residual travels as a second set of factors (same broadcast)
            residuals = exchange.broadcast_global(world, outcome.residuals if world.is_root else None, self.shapes)
        timings["time_broadcast"] = time.perf_counter() - start
        if outcome is None:
            outcome = RoundOutcome(received=[], kept=[], excluded=[])
        outcome.global_factors, outcome.residuals = global_factors, residuals
        return outcome

    def _aggregate_at_root(self, round_index: int, received: list[ReceivedClient], stacks: exchange.ClientStacks,
                           left_out: list[tuple[int, str]]) -> RoundOutcome:
        from florist_mpi.aggregation import aggregate_adapter

        outcome = RoundOutcome(received=received, kept=stacks.clients, excluded=exclusions(received, left_out))
        outcome.stacks = stacks
        self.kill_point("aggregate", round_index)
        if not stacks.clients:
            outcome.error = no_client_left(round_index, outcome.excluded)
            return outcome
        fed = self.federation
        start = time.perf_counter()
        results = aggregate_adapter(
            self.method, stacks.client_stacks(), [c.num_samples for c in stacks.clients],
            tau=fed.tau, max_rank=fed.max_rank,
        )
        outcome.time_aggregate = time.perf_counter() - start
        outcome.results = results
        outcome.global_factors = {
            name: (results[name].B.float().contiguous().numpy(), results[name].A.float().contiguous().numpy())
            for name in self.shapes
        }
        if self.method.folds_residual:
            outcome.residuals = {name: exchange.residual_pair(results[name]) for name in self.shapes}
        return outcome

    def publish(self, outcome, commit):
        if self.world.is_root:
            logged = self.log_client_adapters and not outcome.empty
            commit(self._client_modules(outcome.stacks) if logged else None)

    def _client_modules(self, stacks: exchange.ClientStacks) -> ClientModules:
        """The kept clients' factors for the log, one module at a time."""
        for name in self.shapes:
            yield name, stacks.client_factors(name)


class ShardedAggregation(Aggregation):
    """federation.aggregation: sharded. Owners aggregate their modules; see sharding.py.

    Every rank returns the same outcome fields rank 0 logs (clients, exclusions, every module's
    global factors and spectrum); the client adapters for the log stay with their modules'
    owners until rank 0 writes the round.
    """

    def aggregate(self, round_index, updates, left_out, timings):
        fed = self.federation
        state = sharding.sharded_round(
            self.world,
            updates,
            self.shapes,
            left_out,
            method=fed.method,
            tau=fed.tau,
            max_rank=fed.max_rank,
            before_aggregate=lambda: self.kill_point("aggregate", round_index),
        )
        if not state.kept:  # every rank reached this verdict from the same metadata
            self._nobody_aggregated(no_client_left(round_index, state.excluded))
        timings["time_gather"] = state.time_scatter
        timings["time_aggregate"] = state.time_aggregate
        timings["time_broadcast"] = state.time_allgather
        return RoundOutcome(
            received=state.clients,
            kept=state.kept,
            excluded=state.excluded,
            results=state.results,
            global_factors=state.global_factors,
            residuals=state.residuals if self.method.folds_residual else {},
            sharded=state,
        )

    def publish(self, outcome, commit):
        logged = self.log_client_adapters and not outcome.empty
        if self.world.is_root:
            # streamed from the owners as the log writer consumes it: rank 0 never holds every module's
            # client factors at once (the other ranks send theirs meanwhile, below)
            commit(sharding.stream_client_adapters(self.world, outcome.sharded, self.shapes) if logged else None)
        elif logged:
            sharding.send_client_adapters(self.world, outcome.sharded, self.shapes)


STRATEGIES: dict[str, type[Aggregation]] = {"root": RootAggregation, "sharded": ShardedAggregation}


def make_aggregation(world, federation: FederationConfig, shapes: Shapes, log_client_adapters: bool,
                     kill_point: Callable[[str, int], None]) -> Aggregation:
    """The strategy `federation.aggregation` names."""
    return STRATEGIES[federation.aggregation](world, federation, shapes, log_client_adapters, kill_point)
