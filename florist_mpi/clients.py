"""The clients a rank hosts: their data, who takes part in a round, and their local training.

Every random choice here (which clients are sampled, who drops out, FFA-LoRA's shared A)
derives from (seed, round, client) only, so a client's part of a round is the same on any
number of ranks.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from florist_mpi import comm, methods
from florist_mpi import data as data_lib
from florist_mpi.client_groups import GroupTrainer
from florist_mpi.config import ExperimentConfig
from florist_mpi.exchange import ClientUpdate
from florist_mpi.seeding import Stream, derive_seed, rng
from florist_mpi.training import ClientJob, ClientTrainer, ClientTrainingError, local_tokens
from florist_mpi.warmup import client_data

GlobalFactors = dict[str, tuple[np.ndarray, np.ndarray]]


def sample_participants(cfg: ExperimentConfig, round_index: int) -> list[int]:
    """The round's sampled clients, ascending (every client when clients_per_round covers them all)."""
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


def frozen_A(cfg: ExperimentConfig, shapes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """FFA-LoRA's shared A: drawn once from the run seed, identical for every client and round."""
    largest = max(cfg.lora.rank_of(c) for c in range(cfg.federation.num_clients))
    generator = torch.Generator().manual_seed(derive_seed(cfg.run.seed, 0, 0, Stream.FROZEN_A))
    result = {}
    for name, (_, n) in shapes.items():
        bound = 1.0 / math.sqrt(n)  # PEFT's default A init (kaiming-uniform, a=sqrt(5))
        result[name] = ((torch.rand(largest, n, generator=generator) * 2 - 1) * bound).numpy()
    return result


def gather_counts(world, candidates: list[int], count: Callable[[int], int]) -> dict[int, int]:
    """client id -> count(client) for every candidate, on every rank. Each rank counts only its share,
    candidates[rank::size] (the clients it trains when nobody is left out), and the ranks all-gather
    the counts: no rank has to encode every candidate's data."""
    rows = np.array([[c, count(c)] for c in candidates[world.rank :: world.size]], dtype=np.float64).reshape(-1, 2)
    if world.size > 1:
        rows, _ = comm.allgather_rows(world, rows)
    return {int(client): int(value) for client, value in rows}


class LocalClients:
    """This rank's view of the federation's clients: their training data (encoded when first
    needed) and the local training of those it hosts, on the rank's shared base model."""

    def __init__(self, world, cfg: ExperimentConfig, model, tokenizer, shapes: dict[str, tuple[int, int]],
                 device: torch.device, verbose: bool = False):
        self.world, self.cfg, self.tokenizer, self.verbose = world, cfg, tokenizer, verbose
        self.records = client_data(cfg)  # less the warm-up's share when it is set aside; made when needed
        self._encoded: dict[int, list] = {}
        self.trainer = ClientTrainer(model, shapes, cfg, device)
        self.groups = self._group_trainer(model, shapes, device) if cfg.train.client_batch > 1 else None
        self.frozen_A = frozen_A(cfg, shapes) if methods.get(cfg.federation.method).frozen_A else None

    def num_samples(self, client_id: int) -> int:
        return self.records.num_records(client_id)

    def encoded(self, client_id: int) -> list:
        """The client's records, tokenised when first needed and kept for later rounds."""
        if client_id not in self._encoded:
            self._encoded[client_id] = data_lib.encode_records(
                self.records[client_id], self.tokenizer, self.cfg.data.max_length
            )
        return self._encoded[client_id]

    def token_counts(self, candidates: list[int], round_index: int) -> dict[int, int]:
        """Tokens each candidate's local work processes this round (padding included), for the simulated
        clock; see `gather_counts`."""
        return gather_counts(
            self.world, candidates, lambda c: local_tokens(self.cfg, self.encoded(c), round_index, c)
        )

    def hosted(self, training: list[int]) -> list[int]:
        """The clients of `training` (ascending ids) this rank trains: every world.size-th one."""
        return training[self.world.rank :: self.world.size]

    def _group_trainer(self, model, shapes: dict[str, tuple[int, int]], device: torch.device) -> GroupTrainer:
        """Client batching: groups of at most G, and never more than a rank can host in one round."""
        per_rank = -(-self.cfg.federation.sampled_per_round() // self.world.size)
        return GroupTrainer(model, shapes, self.cfg, device, min(self.cfg.train.client_batch, per_rank))

    def train(self, client_ids: list[int], round_index: int, init_factors: GlobalFactors | None,
              progress: Callable[[int], None] | None = None) -> list[ClientUpdate]:
        """Train the clients, one after another or (train.client_batch > 1) in groups; `init_factors` is the
        kept global update clients start from (FlexLoRA), None for methods whose clients start from a fresh
        LoRA; `progress(done)` is told how many are done after each client (each group when batched)."""
        if self.groups is None:
            updates = []
            for client_id in client_ids:
                updates.append(self._train_one(client_id, round_index, init_factors))
                if progress is not None:
                    progress(len(updates))
            return updates
        jobs = [self._job(client_id, round_index, init_factors) for client_id in client_ids]
        start = time.perf_counter()
        results = self.groups.train(jobs, progress)
        seconds = (time.perf_counter() - start) / max(1, len(jobs))  # trained together: the mean per client
        return [self._outcome(job, results[job.client_id], seconds) for job in jobs]

    def _job(self, client_id: int, round_index: int, init_factors: GlobalFactors | None) -> ClientJob:
        lora = self.cfg.lora
        return ClientJob(
            client_id=client_id, round_index=round_index, rank=lora.rank_of(client_id), alpha=lora.alpha_of(client_id),
            encoded=self.encoded(client_id), init_factors=init_factors, frozen_A=self.frozen_A,
        )

    def _train_one(self, client_id: int, round_index: int, init_factors: GlobalFactors | None) -> ClientUpdate:
        job = self._job(client_id, round_index, init_factors)
        start = time.perf_counter()
        try:
            update = self.trainer.train(job)
        except ClientTrainingError as err:  # incl. an out-of-memory client under train.on_out_of_memory: exclude
            update = err
        return self._outcome(job, update, time.perf_counter() - start)

    def _outcome(self, job: ClientJob, result: ClientUpdate | Exception, seconds: float) -> ClientUpdate:
        """The client's update, or (a recoverable failure) a warning and an update that records the error."""
        if isinstance(result, Exception):
            print(f"florist-mpi: warning (rank {self.world.rank}): client {job.client_id} failed in round "
                  f"{job.round_index} and is left out: {result}", file=sys.stderr, flush=True)
            return ClientUpdate(job.client_id, len(job.encoded), job.rank, math.nan, error=str(result))
        if self.verbose:
            print(f"[rank {self.world.rank}] round {job.round_index} client {job.client_id}: r={job.rank} "
                  f"n={len(job.encoded)} loss={result.train_loss:.4f} ({seconds:.2f}s)", flush=True)
        return result
