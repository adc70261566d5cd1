"""The federated round loop run by every rank (rank 0 also logs).

A round: sample clients -> the simulated clock (if any) decides who is in time -> each rank
trains the clients it hosts -> the aggregation strategy turns their updates into one global
adapter on every rank -> every rank merges it -> evaluation -> rank 0 commits the round to
the log. Each step is one collaborator with one job:

- clients.LocalClients       the rank's clients: data, participation, local training
- aggregators.Aggregation    exchange + aggregation (root or sharded), and the client adapters' way to the log
- global_model.GlobalModel   the rank's copy of the global model: merges, consistency, evaluation
- simclock.Clock             the simulated deployment clock (with a `system` section)
- roundlog.RoundLog          the round's record and its crash-safe commit (rank 0)
- console                    what rank 0 prints
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from florist_mpi import comm, console, simclock, storage
from florist_mpi import data as data_lib
from florist_mpi.aggregators import DROPOUT_REASON, RoundOutcome, make_aggregation
from florist_mpi.clients import LocalClients, dropped_out, sample_participants
from florist_mpi.config import ExperimentConfig
from florist_mpi.devices import place_rank, timed
from florist_mpi.faults import kill_point
from florist_mpi.global_model import GlobalModel
from florist_mpi.model import load_base, quiet_libraries
from florist_mpi.resources import RankMonitor
from florist_mpi.roundlog import RoundLog
from florist_mpi.training import isolate_torch_distributed, prepare_deepspeed


class Federation:
    def __init__(self, world, cfg: ExperimentConfig, plan, verbose: bool = False):
        self.world, self.cfg, self.plan = world, cfg, plan
        quiet_libraries(verbose)
        self.placement = place_rank(world, cfg)  # run.device, agreed by every rank (a CPU/GPU mix is refused)
        self.device = self.placement.device
        isolate_torch_distributed(world.local_rank, self.device)
        prepare_deepspeed(verbose)
        model, tokenizer = load_base(cfg, world, self.device)
        self.model = GlobalModel(world, cfg, model, tokenizer, self.device)
        self.shapes = self.model.shapes
        self.clients = LocalClients(world, cfg, model, tokenizer, self.shapes, self.device, verbose)
        self.aggregation = make_aggregation(world, cfg.federation, self.shapes, cfg.log.client_adapters,
                                            self._kill_point)
        self.log = RoundLog(cfg, world.size, self.shapes, self.clients.num_samples, plan.resume_from, plan.overwrite)
        self.clock = self._start_clock(model) if cfg.system is not None else None
        self.monitor = RankMonitor(world, self.device)
        self.initial_eval = math.nan

    def _start_clock(self, model) -> simclock.Clock:
        cfg = self.cfg
        # Weights every token passes through: the base model's linear layers (embeddings are lookups).
        base_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        tables = data_lib.system_tables(cfg.system, cfg.federation.num_clients)
        return simclock.Clock(cfg, self.shapes, base_params, tables)

    def _kill_point(self, point: str, round_index: int) -> None:
        if self.world.is_root:
            kill_point(point, round_index)

    # --------------------------------------------------------------------- loop

    def run(self) -> None:
        cfg, world = self.cfg, self.world
        first = self.plan.resume_from + 1
        if first > 0:
            self._resume()
        elif cfg.eval.every:
            self.initial_eval = self.model.evaluate()[0]
        self.log.launch = self.monitor.launch()
        if world.is_root:
            console.say(console.banner(cfg, world.size, self.placement.summary, len(self.shapes), first,
                                        self.initial_eval))
        for round_index in range(first, cfg.run.rounds):
            self._run_round(round_index)
        if world.is_root:
            console.say(f"done: {cfg.run.rounds} rounds logged to {self.log.output}")

    def _resume(self) -> None:
        """Replay the logged rounds onto the freshly built base, and the clock's state."""
        with storage.open_log(self.log.output) as handle:
            self.initial_eval = float(handle.attrs.get("initial_eval_loss", math.nan))
            last, residuals = self.model.replay(handle)
            rounds = storage.completed_rounds(handle)
            if self.clock is not None and rounds:
                total = handle["rounds"][storage.round_key(rounds[-1])].attrs["sim_clock_s"]
                self.clock.restore(total, last, residuals)  # last: None when every logged round was empty

    def _run_round(self, round_index: int) -> None:
        cfg, world = self.cfg, self.world
        if world.size > 1:  # start together: rank 0 may still be writing the last round
            world.barrier()
        started = time.perf_counter()
        self.monitor.start_round()
        timings: dict[str, float] = {}
        participants = sample_participants(cfg, round_index)
        dropped = [c for c in participants if dropped_out(cfg, round_index, c)]
        training = [c for c in participants if c not in dropped]
        late: list[tuple[int, str]] = []
        if self.clock is not None:  # the simulated clock decides, before any training, who is too late
            plan = self.clock.plan(self.clients.token_counts(training, round_index))
            training, late = plan.train, plan.stragglers

        hosted = self.clients.hosted(training)
        progress = console.RoundProgress(round_index, len(training), len(hosted)) if world.is_root else None
        with timed(timings, "time_train", self.device):
            self._kill_point("train", round_index)
            updates = self.clients.train(hosted, round_index, self.model.client_init,
                                         progress.update if progress else None)
        self._kill_point("gather", round_index)

        timings["time_wait"] = 0.0
        if world.size > 1:  # wait for the slowest rank here, so that the exchange below is communication only
            with timed(timings, "time_wait"):
                world.barrier()
        left_out = [(c, DROPOUT_REASON) for c in dropped] + late
        outcome = self.aggregation.aggregate(round_index, updates, left_out, timings)
        if not outcome.empty:  # an empty round leaves the global model, and what clients download, as it was
            if self.clock is not None:
                self.clock.advance(outcome.global_factors, outcome.residuals)
            with timed(timings, "time_merge", self.device):
                self.model.apply(outcome.global_factors, outcome.residuals)
        timings.setdefault("time_merge", 0.0)
        self.model.check_consistency(round_index)

        with timed(timings, "time_eval", self.device):
            evaluate = cfg.eval.every and (
                (round_index + 1) % cfg.eval.every == 0 or round_index + 1 == cfg.run.rounds
            )
            evaluation = self.model.evaluate() if evaluate else (math.nan, math.nan)

        ranks = self.monitor.gather(timings, len(hosted))
        # root mode aggregates on rank 0 only; the other phases report their slowest rank
        slowest = comm.reduce_max(world, np.array([timings[k] for k in sorted(timings)])) if world.size > 1 else None
        if slowest is not None:
            timings = dict(zip(sorted(timings), slowest.tolist()))
        if world.is_root and outcome.time_aggregate is not None:
            timings["time_aggregate"] = outcome.time_aggregate
        self.aggregation.publish(outcome, lambda adapters: self._commit(
            round_index, outcome, participants, timings, evaluation, ranks, adapters, started))

    def _commit(self, round_index: int, outcome: RoundOutcome, participants: list[int], timings: dict[str, float],
                evaluation: tuple[float, float], ranks: dict, client_adapters, started: float) -> None:
        """Rank 0: write the round to the log and print its line."""
        clock = None
        if self.clock is not None:
            global_ranks = {name: int(result.rank) for name, result in outcome.results.items()}
            clock = (self.clock.columns(participants),
                     self.clock.close_round([c.client_id for c in outcome.kept], global_ranks))
        # up to the log write below; the write adds its own time (time_log) to it before the round is committed
        timings = {**timings, "time_round": time.perf_counter() - started}
        record = self.log.record(round_index, outcome, participants, timings, evaluation, clock, ranks)
        seconds = self.log.write(record, client_adapters, self.initial_eval, self._kill_point)
        line = console.round_line(round_index, self.cfg.run.rounds, record.attrs, outcome, participants)
        console.say(line + f" log {seconds:.2f}s")
        if outcome.empty:
            console.say(console.empty_round_line(round_index, outcome.excluded))
