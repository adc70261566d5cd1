"""The federated round loop run by every rank (rank 0 also aggregates and logs)."""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from florist_mpi import comm, evaluation, exchange, methods, sharding, simclock, storage
from florist_mpi import data as data_lib
from florist_mpi.config import ExperimentConfig
from florist_mpi.devices import place_rank
from florist_mpi.exchange import ClientUpdate
from florist_mpi.faults import diverges, kill_point
from florist_mpi.lowrank import AggregationResult
from florist_mpi.model import (
    adapted_modules,
    float32_masters,
    load_base,
    merge_update,
    quiet_libraries,
    weights_digest,
)
from florist_mpi.replay import temporarily_merged
from florist_mpi.seeding import Stream, derive_seed, rng
from florist_mpi.training import (
    ClientJob,
    ClientTrainer,
    ClientTrainingError,
    isolate_torch_distributed,
    local_tokens,
    prepare_deepspeed,
)
from florist_mpi.warmup import training_split

DROPOUT_REASON = "dropout (simulated, federation.dropout)"


class SharedFailure(RuntimeError):
    """A failure every rank learned from rank 0's verdict: only rank 0 reports it."""


class RoundFailed(SharedFailure):
    """A round that cannot be completed (e.g. every client was excluded)."""


class RanksDiverged(SharedFailure):
    """The ranks' base weights differ after a merge: the simulation is no longer sound."""


def sample_participants(cfg: ExperimentConfig, round_index: int) -> list[int]:
    total, count = cfg.federation.num_clients, cfg.federation.sampled_per_round()
    if count >= total:
        return list(range(total))
    chosen = rng(cfg.run.seed, round_index, 0, Stream.SAMPLING).choice(total, size=count, replace=False)
    return sorted(int(c) for c in chosen)


def dropped_out(cfg: ExperimentConfig, round_index: int, client_id: int) -> bool:
    """Simulated straggler/dropout, deterministic in (seed, round, client)."""
    if cfg.federation.dropout <= 0:
        return False
    return bool(rng(cfg.run.seed, round_index, client_id, Stream.DROPOUT).random() < cfg.federation.dropout)


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """timings[key] = wall seconds of the block (left unset when the block raises)."""
    start = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - start


@dataclass
class RoundOutcome:
    """What the aggregation of one round decided: on rank 0 (root mode) or on every rank (sharded)."""

    received: list[ClientUpdate]  # every client that trained this round (failed ones included)
    kept: list[ClientUpdate]  # the clients aggregated
    excluded: list[tuple[int, str]]  # (client id, reason), sorted
    results: dict[str, AggregationResult] = field(default_factory=dict)  # module -> the method's result
    global_factors: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # module -> fp32 (B, A)
    # seconds of the aggregation itself on rank 0 (root mode); None in sharded mode, where every owner
    # times its own share and the round's phase timings already take the slowest rank's
    time_aggregate: float | None = None
    error: str | None = None  # why the round cannot be aggregated (no client left)
    sharded: sharding.ShardedRound | None = None  # sharded mode: the owners' state, for the client adapters


def frozen_A(cfg: ExperimentConfig, shapes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """FFA-LoRA's shared A: drawn once from the run seed, identical for every client and round."""
    largest = max(cfg.lora.rank_of(c) for c in range(cfg.federation.num_clients))
    generator = torch.Generator().manual_seed(derive_seed(cfg.run.seed, 0, 0, Stream.FROZEN_A))
    result = {}
    for name, (_, n) in shapes.items():
        bound = 1.0 / math.sqrt(n)  # PEFT's default A init (kaiming-uniform, a=sqrt(5))
        result[name] = ((torch.rand(largest, n, generator=generator) * 2 - 1) * bound).numpy()
    return result


def library_versions() -> dict:
    import deepspeed
    import h5py
    import mpi4py
    import peft
    import transformers
    from mpi4py import MPI

    from florist_mpi import __version__

    return {
        "florist_mpi": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "deepspeed": deepspeed.__version__, "mpi4py": mpi4py.__version__,
        "h5py": h5py.__version__, "mpi": MPI.Get_library_version().splitlines()[0].strip(),
    }


@dataclass
class ClockState:
    """The simulated clock across rounds (rank-independent; rebuilt from the log on --resume)."""

    profile: simclock.ClientProfile
    base_params: int  # weights of the base model's linear layers
    global_ranks: dict[str, int] | None = None  # module -> r_g of the last round (what clients download next)
    total_s: float = 0.0  # sim_clock_s so far


@dataclass
class RoundClock:
    """One round's simulated figures, computed before training."""

    work: dict[int, simclock.ClientWork]
    times: dict[int, simclock.ClientTimes]
    schedule: simclock.Schedule


class Federation:
    def __init__(self, world, cfg: ExperimentConfig, plan, verbose: bool = False):
        self.world, self.cfg, self.plan, self.verbose = world, cfg, plan, verbose
        self.output = Path(cfg.run.output)
        quiet_libraries(verbose)
        self.placement = place_rank(world, cfg)  # run.device, agreed by every rank (a CPU/GPU mix is refused)
        self.device = self.placement.device
        isolate_torch_distributed(world.local_rank, self.device)
        prepare_deepspeed(verbose)
        self.model, self.tokenizer = load_base(cfg, world, self.device)
        self.modules = adapted_modules(self.model, cfg.lora.target_modules)
        self.shapes = {name: tuple(module.weight.shape) for name, module in self.modules.items()}
        self.masters = float32_masters(self.modules)  # merges of bf16/fp16 weights go through fp32
        self.trainer = ClientTrainer(self.model, self.shapes, cfg, self.device)
        self.client_records = training_split(cfg)[0]  # less the warm-up's share when it is set aside
        self._encoded: dict[int, list] = {}
        self.eval_set = self._load_eval_shard()
        self.method = methods.get(cfg.federation.method)
        self.frozen_A = frozen_A(cfg, self.shapes) if self.method.frozen_A else None
        # the kept global update clients start from (methods that keep the base: FlexLoRA)
        self.client_init: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        self.log_started = plan.resume_from >= 0
        self.initial_eval = math.nan
        self.clock = self._start_clock() if cfg.system is not None else None
        self.round_clock: RoundClock | None = None  # this round's simulated figures (system section only)

    # ------------------------------------------------------------------ set-up

    def _load_eval_shard(self):
        if not self.cfg.eval.every:
            return None
        records = evaluation.shard(evaluation.eval_set_records(self.cfg), self.world.rank, self.world.size)
        if self.cfg.eval.kind == "mmlu":
            return evaluation.multiple_choice_items(records, self.tokenizer, self.cfg.data.max_length)
        return data_lib.encode_records(records, self.tokenizer, self.cfg.data.max_length)

    def _encoded_client(self, client_id: int):
        if client_id not in self._encoded:
            self._encoded[client_id] = data_lib.encode_records(
                self.client_records[client_id], self.tokenizer, self.cfg.data.max_length
            )
        return self._encoded[client_id]

    def _restore_from_log(self) -> None:
        """Replay the logged global updates onto the freshly built base (bitwise the same ops)."""
        with storage.open_log(self.output) as handle:
            rounds = storage.completed_rounds(handle)
            self.initial_eval = float(handle.attrs.get("initial_eval_loss", math.nan))
            for round_index in rounds:
                factors = storage.read_global_factors(handle, round_index)
                if self.method.keeps_base:
                    self.client_init = factors
                else:
                    merge_update(self.modules, {name: factors[name] for name in self.shapes}, self.masters)
            if self.clock is not None and rounds:
                self._restore_clock(handle, rounds[-1], factors)

    # --------------------------------------------------------------------- loop

    def run(self) -> None:
        cfg, world = self.cfg, self.world
        first = self.plan.resume_from + 1
        if first > 0:
            self._restore_from_log()
        elif cfg.eval.every:
            self.initial_eval = self._evaluate()[0]
        if world.is_root:
            self._say(self._banner(first))
        for round_index in range(first, cfg.run.rounds):
            self._run_round(round_index)
        if world.is_root:
            self._say(f"done: {cfg.run.rounds} rounds logged to {self.output}")

    def _run_round(self, round_index: int) -> None:
        cfg, world = self.cfg, self.world
        timings: dict[str, float] = {}
        participants = sample_participants(cfg, round_index)
        dropped = [c for c in participants if dropped_out(cfg, round_index, c)]
        training = [c for c in participants if c not in dropped]
        late: list[tuple[int, str]] = []
        if self.clock is not None:  # the simulated clock decides, before any training, who is too late
            self.round_clock = self._plan_clock(round_index, training)
            training, late = self.round_clock.schedule.train, self.round_clock.schedule.stragglers
        mine = training[world.rank :: world.size]

        with timed(timings, "time_train"):
            self._kill_point("train", round_index)
            updates = [self._train_one(client_id, round_index) for client_id in mine]
        self._kill_point("gather", round_index)

        if cfg.federation.aggregation == "sharded":
            outcome, global_factors = self._aggregate_sharded(round_index, updates, dropped, late, timings)
        else:
            outcome, global_factors = self._aggregate_at_root(round_index, updates, dropped, late, timings)
        if self.clock is not None:
            self.clock.global_ranks = {name: int(B.shape[1]) for name, (B, _) in global_factors.items()}

        with timed(timings, "time_merge"):
            if self.method.keeps_base:
                self.client_init = global_factors
            else:
                merge_update(self.modules, global_factors, self.masters)
        self._check_consistency(round_index)

        with timed(timings, "time_eval"):
            evaluate = cfg.eval.every and (
                (round_index + 1) % cfg.eval.every == 0 or round_index + 1 == cfg.run.rounds
            )
            eval_loss, eval_accuracy = self._evaluate(global_factors) if evaluate else (math.nan, math.nan)

        # aggregation happens on rank 0 only; the other phases report their slowest rank
        slowest = comm.reduce_max(world, np.array([timings[k] for k in sorted(timings)])) if world.size > 1 else None
        if slowest is not None:
            timings = dict(zip(sorted(timings), slowest.tolist()))
        if world.is_root:
            if outcome.time_aggregate is not None:
                timings["time_aggregate"] = outcome.time_aggregate
            self._commit_round(round_index, outcome, timings, eval_loss, eval_accuracy, participants)
        elif outcome is not None and outcome.sharded is not None and cfg.log.client_adapters:
            # rank 0 is writing the round and takes its client adapters module by module
            sharding.send_client_adapters(world, outcome.sharded, self.shapes)

    def _kill_point(self, point: str, round_index: int) -> None:
        if self.world.is_root:
            kill_point(point, round_index)

    # ------------------------------------------------------------ client side

    def _job(self, client_id: int, round_index: int) -> ClientJob:
        lora = self.cfg.lora
        return ClientJob(
            client_id=client_id, round_index=round_index, rank=lora.rank_of(client_id), alpha=lora.alpha_of(client_id),
            encoded=self._encoded_client(client_id), init_factors=self.client_init, frozen_A=self.frozen_A,
        )

    def _train_one(self, client_id: int, round_index: int) -> ClientUpdate:
        job = self._job(client_id, round_index)
        start = time.perf_counter()
        try:
            update = self.trainer.train(job)
        except (ClientTrainingError, torch.OutOfMemoryError) as err:
            print(f"florist-mpi: warning (rank {self.world.rank}): client {client_id} failed in round "
                  f"{round_index} and is left out: {err}", file=sys.stderr, flush=True)
            return ClientUpdate(client_id, len(job.encoded), job.rank, math.nan, error=str(err))
        if self.verbose:
            print(f"[rank {self.world.rank}] round {round_index} client {client_id}: r={job.rank} "
                  f"n={len(job.encoded)} loss={update.train_loss:.4f} ({time.perf_counter() - start:.1f}s)", flush=True)
        return update

    # ------------------------------------------------------------ server side

    def _aggregate_at_root(
        self, round_index: int, updates, dropped: list[int], late: list[tuple[int, str]], timings: dict
    ) -> tuple[RoundOutcome | None, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """federation.aggregation: root. Rank 0 gathers every client, aggregates, broadcasts.
        The outcome is rank 0's (None elsewhere); the global factors are every rank's."""
        world = self.world
        with timed(timings, "time_gather"):
            received = exchange.gather_updates(world, updates, self.shapes)

        with timed(timings, "time_aggregate"):
            outcome = self._aggregate(round_index, received, dropped, late) if world.is_root else None
            failure = comm.root_verdict(world, outcome.error if world.is_root else None)
            if failure:
                raise RoundFailed(failure)

        with timed(timings, "time_broadcast"):
            root_factors = outcome.global_factors if world.is_root else None
            global_factors = exchange.broadcast_global(world, root_factors, self.shapes)
        return outcome, global_factors

    def _aggregate_sharded(
        self, round_index: int, updates, dropped: list[int], late: list[tuple[int, str]], timings: dict
    ) -> tuple[RoundOutcome, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """federation.aggregation: sharded. Owners aggregate their modules; see sharding.py.

        Every rank returns the same outcome fields rank 0 logs (clients, exclusions, every
        module's global factors and spectrum); the client adapters for the log stay with
        their modules' owners until rank 0 writes the round.
        """
        fed, world = self.cfg.federation, self.world
        state = sharding.sharded_round(
            world,
            updates,
            self.shapes,
            [(c, DROPOUT_REASON) for c in dropped] + list(late),
            method=fed.method,
            tau=fed.tau,
            max_rank=fed.max_rank,
            before_aggregate=lambda: self._kill_point("aggregate", round_index),
        )
        if not state.kept:  # every rank reached this verdict from the same metadata
            reasons = "; ".join(f"client {c}: {why}" for c, why in state.excluded)
            raise RoundFailed(f"round {round_index} has no client left to aggregate ({reasons})")
        timings["time_gather"] = state.time_scatter
        timings["time_aggregate"] = state.time_aggregate
        timings["time_broadcast"] = state.time_allgather
        outcome = RoundOutcome(
            received=state.clients,
            kept=state.kept,
            excluded=state.excluded,
            results=state.results,
            global_factors=state.global_factors,
            sharded=state,
        )
        return outcome, state.global_factors

    def _client_adapters_for_log(self, outcome: RoundOutcome):
        """The round's client adapters for its record, taken when the round is written (in
        sharded mode the other ranks send theirs then, see `_run_round`); None when not logged."""
        if not self.cfg.log.client_adapters:
            return None
        if outcome.sharded is not None:
            return self._streamed_client_adapters(outcome.sharded)
        return self._client_modules(outcome.kept)

    def _streamed_client_adapters(self, state: "sharding.ShardedRound"):
        """The round's client adapters for the log, received from their owners as they are written:
        (module, {client id: (B, A)}) one module at a time, which storage consumes while the other
        ranks send (so rank 0 never holds all modules' client factors at once)."""
        return sharding.stream_client_adapters(self.world, state, self.shapes)

    def _aggregate(
        self, round_index: int, received, dropped: list[int], late: list[tuple[int, str]] = ()
    ) -> RoundOutcome:
        from florist_mpi.aggregation import aggregate_adapter

        excluded = [(c, DROPOUT_REASON) for c in dropped] + list(late)
        kept = []
        for client in received:
            if client.failed:
                excluded.append((client.client_id, exchange.REASON_FAILED))
            elif not all(np.isfinite(B).all() and np.isfinite(A).all() for B, A in client.factors.values()):
                excluded.append((client.client_id, exchange.REASON_NONFINITE))
            else:
                kept.append(client)
        outcome = RoundOutcome(received=received, kept=kept, excluded=sorted(excluded))
        self._kill_point("aggregate", round_index)
        if not kept:
            reasons = "; ".join(f"client {c}: {why}" for c, why in sorted(excluded))
            outcome.error = f"round {round_index} has no client left to aggregate ({reasons})"
            return outcome
        fed = self.cfg.federation
        timing: dict[str, float] = {}
        with timed(timing, "aggregate"):
            per_module = {
                name: [(torch.from_numpy(c.factors[name][0]), torch.from_numpy(c.factors[name][1])) for c in kept]
                for name in self.shapes
            }
            results = aggregate_adapter(
                self.method, per_module, [c.num_samples for c in kept], tau=fed.tau, max_rank=fed.max_rank
            )
        outcome.time_aggregate = timing["aggregate"]
        outcome.results = results
        outcome.global_factors = {
            name: (results[name].B.float().contiguous().numpy(), results[name].A.float().contiguous().numpy())
            for name in self.shapes
        }
        return outcome

    def _check_consistency(self, round_index: int) -> None:
        if diverges(round_index, self.world.rank):
            with torch.no_grad():
                next(iter(self.modules.values())).weight.view(-1)[0] += 1e-3
        digest = weights_digest(self.modules)
        if self.world.size == 1:
            return
        digests = comm.gather_digests(self.world, digest)
        verdict = None
        if self.world.is_root:
            differing = [rank for rank, d in enumerate(digests) if d != digests[0]]
            if differing:
                verdict = f"base weights differ between rank 0 and ranks {differing} after round {round_index}"
        verdict = comm.root_verdict(self.world, verdict)
        if verdict:
            raise RanksDiverged(verdict)

    # ------------------------------------------------------------- evaluation

    def _evaluate(self, global_factors=None) -> tuple[float, float]:
        """Held-out loss (and MMLU accuracy) of the global model, split over ranks."""
        if self.eval_set is None:
            return math.nan, math.nan
        if self.method.keeps_base and global_factors is not None:
            # the base is kept (FlexLoRA): the global model is base + the aggregated update
            with temporarily_merged(self.modules, global_factors, self.masters):
                return self._evaluate_model()
        return self._evaluate_model()

    def _evaluate_model(self) -> tuple[float, float]:
        self.model.eval()  # local training left the shared base in train mode (dropout on)
        if self.cfg.eval.kind == "mmlu":
            correct, total = evaluation.multiple_choice_correct(self.model, self.eval_set, self.device)
            correct, total = (
                comm.allreduce_sum(self.world, np.array([correct, total])) if self.world.size > 1 else (correct, total)
            )
            return math.nan, float(correct) / float(total) if total else math.nan
        total, count = evaluation.loss_sums(self.model, self.eval_set, self.cfg.eval.batch_size, self.device)
        if self.world.size > 1:
            total, count = comm.allreduce_sum(self.world, np.array([total, count]))
        return evaluation.mean_loss(float(total), int(count)), math.nan

    # ---------------------------------------------------------------- logging

    def _header(self) -> storage.RunHeader:
        return storage.RunHeader(
            config_yaml=self.cfg.to_yaml(),
            method=self.cfg.federation.method,
            tau=self.cfg.federation.tau,
            num_clients=self.cfg.federation.num_clients,
            world_size=self.world.size,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            versions=library_versions(),
            modules=list(self.shapes),
            module_shapes=list(self.shapes.values()),
            initial_eval_loss=self.initial_eval,
        )

    def _commit_round(
        self, round_index: int, outcome: RoundOutcome, timings: dict[str, float], eval_loss: float,
        eval_accuracy: float, participants: list[int]
    ) -> None:
        kept, received = outcome.kept, {c.client_id: c for c in outcome.received}
        results = outcome.results
        lora = self.cfg.lora
        clients = {
            "id": np.array(participants, dtype=np.int64),
            "num_samples": np.array([len(self.client_records[c]) for c in participants], dtype=np.int64),
            "rank": np.array([lora.rank_of(c) for c in participants], dtype=np.int64),
            "train_loss": np.array([received[c].train_loss if c in received else math.nan for c in participants]),
        }
        bytes_up = 4 * sum(self._factor_floats(c.rank) for c in kept)
        attrs = {
            "tau": float(self.cfg.federation.tau),
            **{k: float(v) for k, v in timings.items()},
            "bytes_up": int(bytes_up),
            "bytes_down": int(self._bytes_down(outcome.global_factors)),
            "eval_loss": float(eval_loss),
            "eval_accuracy": float(eval_accuracy),
            "world_size": int(self.world.size),
        }
        if self.clock is not None:
            clients.update(self._clock_columns(participants))
            attrs.update(self._clock_attrs(outcome))
        record = storage.RoundRecord(
            index=round_index,
            attrs=attrs,
            clients=clients,
            excluded=outcome.excluded,
            global_factors={
                name: (
                    B,
                    A,
                    results[name].singular_values.double().numpy(),
                    results[name].rank,
                    float(results[name].energy),
                )
                for name, (B, A) in outcome.global_factors.items()
            },
            client_adapters=self._client_adapters_for_log(outcome),
        )
        # test hooks: a kill with the round written but unpublished, and between its file's rename and its link
        hooks = {
            "before_publish": lambda: self._kill_point("write", round_index),
            "before_link": lambda: self._kill_point("link", round_index),
        }
        written: dict[str, float] = {}
        with timed(written, "log"):
            self._write_round(round_index, record, hooks)
        self._say(self._round_line(round_index, attrs, outcome, participants) + f" log {written['log']:.2f}s")

    def _write_round(self, round_index: int, record: storage.RoundRecord, hooks: dict) -> None:
        """Create the log with its first round, or append the round (crash-safe, see storage.py)."""
        if not self.log_started:
            storage.create_log(self.output, self._header(), replace=self.plan.overwrite, first_round=record, **hooks)
            self.log_started = True
        else:
            # The first round after a resume also records the config it was resumed with (the
            # root world_size stays the creating run's; every round holds its own).
            resumed = round_index == self.plan.resume_from + 1 and self.plan.resume_from >= 0
            root = {"config": self.cfg.to_yaml()} if resumed else None
            storage.append_round(self.output, record, root_attrs=root, **hooks)

    def _client_modules(self, kept):
        """The kept clients' factors for the log, one module at a time: (module, {client id: (B, A)})."""
        for name in self.shapes:
            yield name, {c.client_id: c.factors[name] for c in kept}

    def _factor_floats(self, rank: int) -> int:
        """Floats one client's rank-`rank` factors take on the wire (the method says which travel)."""
        return sum(self.method.wire_floats(rank, m, n) for m, n in self.shapes.values())

    def _bytes_down(self, global_factors) -> int:
        """fp32 bytes the server sends, summed over every client (each gets its own prefix in FlexLoRA)."""
        lora, fed = self.cfg.lora, self.cfg.federation
        total = 0
        for client_id in range(fed.num_clients):
            for B, A in global_factors.values():
                r = self.method.download_rank(B.shape[1], lora.rank_of(client_id))
                total += 4 * self.method.wire_floats(r, B.shape[0], A.shape[1])
        return total

    # ------------------------------------------------------- simulated clock
    # Only with a `system` section (docs/simulated-clock.md). Every figure comes from the
    # config and the round's plan, never from wall time: the same on any number of ranks.

    def _start_clock(self) -> ClockState:
        cfg = self.cfg
        tables = data_lib.system_tables(cfg.system, cfg.federation.num_clients)
        profile = simclock.resolve_profile(cfg.system, cfg.federation.num_clients, cfg.run.seed, tables)
        # Weights every token passes through: the base model's linear layers (embeddings are lookups).
        base_params = sum(m.weight.numel() for m in self.model.modules() if isinstance(m, torch.nn.Linear))
        return ClockState(profile=profile, base_params=int(base_params))

    def _restore_clock(self, handle, last_round: int, last_factors) -> None:
        """The running total and the global ranks the next round's clients download, from the log."""
        self.clock.total_s = float(handle["rounds"][storage.round_key(last_round)].attrs["sim_clock_s"])
        self.clock.global_ranks = {name: int(B.shape[1]) for name, (B, _) in last_factors.items()}

    def _client_work(self, client_id: int, round_index: int) -> simclock.ClientWork:
        method, rank = self.cfg.federation.method, self.cfg.lora.rank_of(client_id)
        tokens = local_tokens(self.cfg, self._encoded_client(client_id), round_index, client_id)
        per_token = simclock.training_flops_per_token(
            self.clock.base_params, *simclock.adapter_params(method, self.shapes, rank)
        )
        return simclock.ClientWork(
            client_id=client_id,
            tokens=tokens,
            flops=tokens * per_token,
            bytes_down=simclock.download_bytes(method, self.shapes, self.clock.global_ranks, rank),
            bytes_up=simclock.upload_bytes(method, self.shapes, rank),
        )

    def _plan_clock(self, round_index: int, candidates: list[int]) -> RoundClock:
        """Simulated times of the clients that start the round, and which of them train."""
        system = self.cfg.system
        work = {c: self._client_work(c, round_index) for c in candidates}
        times = {c: simclock.client_times(w, self.clock.profile, system.reference_flops) for c, w in work.items()}
        plan = simclock.schedule(times, self.cfg.federation.participants_per_round(), system.deadline_s)
        return RoundClock(work=work, times=times, schedule=plan)

    def _clock_columns(self, participants: list[int]) -> dict[str, np.ndarray]:
        """clients/ datasets, aligned with clients/id (zero bytes and NaN times: did not start)."""
        work, times = self.round_clock.work, self.round_clock.times
        nan = simclock.ClientTimes(math.nan, math.nan, math.nan)
        return {
            "bytes_down": np.array([work[c].bytes_down if c in work else 0 for c in participants], dtype=np.int64),
            "bytes_up": np.array([work[c].bytes_up if c in work else 0 for c in participants], dtype=np.int64),
            "sim_tokens": np.array([work[c].tokens if c in work else 0 for c in participants], dtype=np.int64),
            "sim_download_s": np.array([times.get(c, nan).download_s for c in participants], dtype=np.float64),
            "sim_compute_s": np.array([times.get(c, nan).compute_s for c in participants], dtype=np.float64),
            "sim_upload_s": np.array([times.get(c, nan).upload_s for c in participants], dtype=np.float64),
        }

    def _clock_attrs(self, outcome: RoundOutcome) -> dict[str, float]:
        """sim_server_s, sim_time_s and the running total sim_clock_s of a completed round."""
        method, lora = self.cfg.federation.method, self.cfg.lora
        kept = [c.client_id for c in outcome.kept]
        global_ranks = {name: int(result.rank) for name, result in outcome.results.items()}
        flops = simclock.aggregation_flops(method, self.shapes, [lora.rank_of(c) for c in kept], global_ranks)
        server_s = flops / self.cfg.system.server_flops
        round_s = simclock.round_seconds(server_s, [self.round_clock.times[c] for c in kept])
        self.clock.total_s += round_s
        return {"sim_server_s": float(server_s), "sim_time_s": float(round_s), "sim_clock_s": float(self.clock.total_s)}

    # ---------------------------------------------------------------- output

    def _say(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()

    def _banner(self, first: int) -> str:
        cfg, world = self.cfg, self.world
        what = f"resuming after round {first - 1}" if first else "starting"
        initial = f", initial eval loss {self.initial_eval:.4f}" if math.isfinite(self.initial_eval) else ""
        return (
            f"florist-mpi {what}: {cfg.federation.method} (tau={cfg.federation.tau}) | "
            f"{cfg.federation.num_clients} clients "
            f"on {world.size} rank(s), device {self.placement.summary} | {len(self.shapes)} adapted modules | "
            f"{cfg.run.rounds} rounds -> {self.output}{initial}"
        )

    def _round_line(self, round_index: int, attrs: dict, outcome: RoundOutcome, participants: list[int]) -> str:
        ranks = [r.rank for r in outcome.results.values()]
        kept = outcome.kept
        losses = [c.train_loss for c in kept]
        eval_part = "eval -"
        if math.isfinite(attrs["eval_loss"]):
            eval_part = f"eval loss {attrs['eval_loss']:.4f} (ppl {evaluation.perplexity(attrs['eval_loss']):.1f})"
        if math.isfinite(attrs.get("eval_accuracy", math.nan)):
            eval_part = f"eval acc {attrs['eval_accuracy']:.3f}"
        phases = " ".join(
            f"{k.removeprefix('time_')} {attrs[k]:.2f}s"
            for k in ("time_train", "time_gather", "time_aggregate", "time_broadcast", "time_merge", "time_eval")
        )
        excluded = f" ({len(outcome.excluded)} excluded)" if outcome.excluded else ""
        simulated = (
            f" | sim {attrs['sim_time_s']:.1f}s (clock {attrs['sim_clock_s']:.1f}s)" if "sim_time_s" in attrs else ""
        )
        return (
            f"round {round_index} ({round_index + 1}/{self.cfg.run.rounds}) | "
            f"clients {len(kept)}/{len(participants)}{excluded} | "
            f"train loss {np.mean(losses):.4f} | {eval_part} | global rank mean {np.mean(ranks):.1f} "
            f"| down {attrs['bytes_down'] / 1e6:.2f} MB{simulated} | {phases}"
        )
