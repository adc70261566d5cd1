"""Rank 0's side of the run log: the header, one record per round, and its crash-safe commit.

What a round's record holds is documented in docs/log-format.md; how it reaches the disk
without ever exposing a half-written round is storage.py's business.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import torch

from florist_mpi import methods, storage
from florist_mpi.aggregators import ClientModules, RoundOutcome
from florist_mpi.config import ExperimentConfig

BYTES_PER_FLOAT = 4  # factors travel as fp32


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


class RoundLog:
    """Builds each round's `storage.RoundRecord` and writes it: the first round creates the log (with
    its header), every later one is appended; a resumed run appends after the last logged round."""

    def __init__(self, cfg: ExperimentConfig, world_size: int, shapes: dict[str, tuple[int, int]],
                 num_samples_of: Callable[[int], int], resume_from: int, overwrite: bool):
        self.cfg, self.world_size, self.shapes = cfg, world_size, shapes
        self.method = methods.get(cfg.federation.method)
        self.num_samples_of = num_samples_of
        self.output = Path(cfg.run.output)
        self.resume_from, self.overwrite = resume_from, overwrite
        self.started = resume_from >= 0
        # every registered client's LoRA rank, counted once: the downlink goes to all of them
        self.client_ranks = Counter(cfg.lora.rank_of(c) for c in range(cfg.federation.num_clients))
        # this launch's start-up, hosts, threads and Slurm ids (resources.RankMonitor.launch), written
        # with the launch's first round
        self.launch: dict | None = None
        self._launch_logged = False

    # ------------------------------------------------------------------ bytes

    def _factor_floats(self, rank: int) -> int:
        """Floats one client's rank-`rank` factors take on the wire (the method says which travel)."""
        return sum(self.method.wire_floats(rank, m, n) for m, n in self.shapes.values())

    def bytes_up(self, kept_ranks: list[int]) -> int:
        """fp32 bytes the aggregated clients uploaded."""
        return BYTES_PER_FLOAT * sum(count * self._factor_floats(r) for r, count in Counter(kept_ranks).items())

    def bytes_down(self, global_factors, residuals=None) -> int:
        """fp32 bytes the server sends, summed over every client (`Method.downlink_floats`: each gets its own
        prefix in FlexLoRA and HetLoRA; FedEx-LoRA adds the residual, module -> (m×q, q×n) in `residuals`);
        nothing after a round without a global update."""
        total, residuals = 0, residuals or {}
        for client_rank, count in self.client_ranks.items():
            for name, (B, A) in global_factors.items():
                q = residuals[name][0].shape[1] if name in residuals else 0
                total += count * self.method.downlink_floats(B.shape[1], client_rank, B.shape[0], A.shape[1], q)
        return BYTES_PER_FLOAT * total

    # ----------------------------------------------------------------- record

    def header(self, initial_eval_loss: float) -> storage.RunHeader:
        cfg = self.cfg
        return storage.RunHeader(
            config_yaml=cfg.to_yaml(),
            method=cfg.federation.method,
            tau=cfg.federation.tau,
            num_clients=cfg.federation.num_clients,
            world_size=self.world_size,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            versions=library_versions(),
            modules=list(self.shapes),
            module_shapes=list(self.shapes.values()),
            initial_eval_loss=initial_eval_loss,
        )

    def record(self, round_index: int, outcome: RoundOutcome, participants: list[int], timings: dict[str, float],
               evaluation: tuple[float, float], clock: tuple[dict, dict] | None = None,
               ranks: dict[str, np.ndarray] | None = None) -> storage.RoundRecord:
        """The round's record: `timings` are its phase seconds, `evaluation` (eval loss, eval accuracy),
        `clock` the simulated clock's (clients/ columns, attributes) when there is a system section,
        `ranks` every MPI rank's figures (the ranks/ group)."""
        lora = self.cfg.lora
        received = {c.client_id: c for c in outcome.received}
        clients = {
            "id": np.array(participants, dtype=np.int64),
            "num_samples": np.array([self.num_samples_of(c) for c in participants], dtype=np.int64),
            "rank": np.array([lora.rank_of(c) for c in participants], dtype=np.int64),
            "train_loss": np.array([received[c].train_loss if c in received else math.nan for c in participants]),
        }
        attrs = {
            "tau": float(self.cfg.federation.tau),
            **{k: float(v) for k, v in timings.items()},
            "bytes_up": int(self.bytes_up([c.rank for c in outcome.kept])),
            "bytes_down": int(self.bytes_down(outcome.global_factors, outcome.residuals)),
            "clients_aggregated": len(outcome.kept),
            "eval_loss": float(evaluation[0]),
            "eval_accuracy": float(evaluation[1]),
            "world_size": int(self.world_size),
        }
        if clock is not None:
            clients.update(clock[0])
            attrs.update(clock[1])
        if self.launch is not None and not self._launch_logged:
            attrs["time_startup"] = float(self.launch["time_startup"])  # this launch's, on its first round
        return storage.RoundRecord(
            index=round_index, attrs=attrs, clients=clients, excluded=outcome.excluded,
            global_factors=self._global_record(outcome), ranks=ranks, residuals=outcome.residuals or None,
        )

    def _launch_attrs(self) -> dict:
        """Root attributes of the latest launch: where it ran and how long it took to start."""
        if self.launch is None:
            return {}
        launch = dict(self.launch)
        launch["hosts"] = np.array(launch["hosts"], dtype=h5py.string_dtype())
        return launch

    def _global_record(self, outcome: RoundOutcome) -> dict:
        """module -> (B, A, singular values, rank, energy); a round without a global update (no client
        aggregated) logs rank-0 factors, an empty spectrum and energy NaN."""
        if outcome.empty:
            return {
                name: (np.zeros((m, 0), np.float32), np.zeros((0, n), np.float32), np.zeros(0), 0, math.nan)
                for name, (m, n) in self.shapes.items()
            }
        results = outcome.results
        return {
            name: (B, A, results[name].singular_values.double().numpy(), results[name].rank,
                   float(results[name].energy))
            for name, (B, A) in outcome.global_factors.items()
        }

    # ------------------------------------------------------------------ write

    def write(self, record: storage.RoundRecord, client_adapters: ClientModules | None, initial_eval_loss: float,
              kill_point: Callable[[str, int], None]) -> float:
        """Create the log with its first round, or append the round (crash-safe, see storage.py); returns
        the seconds it took."""
        record.client_adapters = client_adapters
        round_index = record.index
        # test hooks: a kill with the round written but unpublished, and between its file's rename and its link
        hooks = {
            "before_publish": lambda: kill_point("write", round_index),
            "before_link": lambda: kill_point("link", round_index),
        }
        start = time.perf_counter()
        round_so_far = float(record.attrs.get("time_round", 0.0))

        def finish(attrs) -> None:
            # the round's own write, up to its file's close, fsync and link (milliseconds), which follow it
            attrs["time_log"] = time.perf_counter() - start
            attrs["time_round"] = round_so_far + attrs["time_log"]

        launch = {} if self._launch_logged else self._launch_attrs()
        if not self.started:
            header = self.header(initial_eval_loss)
            header.extra.update(launch)
            storage.create_log(self.output, header, replace=self.overwrite, first_round=record, **hooks,
                               before_cleanup=lambda: kill_point("clean", round_index), finish=finish)
            self.started = True
        else:
            # The first round after a resume also records the config it was resumed with and where this
            # launch ran (the root world_size stays the creating run's; every round holds its own).
            root = {"config": self.cfg.to_yaml(), **launch} if not self._launch_logged else None
            storage.append_round(self.output, record, root_attrs=root, finish=finish, **hooks)
        self._launch_logged = True
        return time.perf_counter() - start
