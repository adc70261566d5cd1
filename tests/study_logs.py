"""Synthetic logs of a scaling study with chosen round times and per-rank figures (no training).

Each log is what jobs/scaling_study.sbatch would write for one (clients, ranks) pair of configs/demo.yaml:
the same overrides (every client sampled, one LoRA rank for all), one adapted module, and round
attributes and a `ranks/` group whose numbers the caller picks, so that tests can recompute the
report's speed-ups, efficiencies and summaries by hand.
"""
from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
from conftest import REPO

from florist_mpi import storage
from florist_mpi.config import load_config

MODULE = "model.layers.0.self_attn.q_proj"
SHAPE = (6, 5)


def study_overrides(clients: int, output: Path, extra: dict | None = None) -> list[str]:
    """The `--set` overrides of jobs/scaling_study.sbatch for `clients` clients writing `output`."""
    values = {"run.output": str(output), "federation.num_clients": clients, "federation.clients_per_round": "null",
              "lora.ranks": "null", "lora.rank": 8, **(extra or {})}
    return [f"{key}={value}" for key, value in values.items()]


def write_study_log(path: Path, *, clients: int, round_s: list[float], train_s: list[list[float]],
                    rss: list[list[int]] | None = None, mpi_sent: list[list[int]] | None = None,
                    bytes_up: int = 1000, bytes_down: int = 2000, startup: float = 5.0,
                    hosts: list[str] | None = None, extra: dict | None = None, time_round: bool = True,
                    gpu: list[list[int]] | None = None) -> list[dict]:
    """Write a log of len(round_s) rounds on len(train_s[0]) ranks; returns the attributes written per round.

    `train_s[r][k]`: rank k's training time in round r; the round attributes are the maxima, as a run
    records them. `extra`: further config overrides (a key that a study may not vary, for the refusal tests);
    `gpu[r][k]`: rank k's peak GPU bytes in round r (a run on GPUs), none by default.
    """
    cfg = load_config(REPO / "configs/demo.yaml", study_overrides(clients, path, extra))
    world = len(train_s[0])
    header = storage.RunHeader(
        config_yaml=cfg.to_yaml(), method=cfg.federation.method, tau=cfg.federation.tau, num_clients=clients,
        world_size=world, created="2026-01-01T00:00:00+00:00", versions={"florist_mpi": "test"},
        modules=[MODULE], module_shapes=[SHAPE], initial_eval_loss=6.0,
        extra={"time_startup": startup, "hosts": np.array(hosts or ["node0"] * world, dtype=h5py.string_dtype()),
               "num_nodes": len(set(hosts or ["node0"])), "threads_per_rank": np.ones(world, dtype=np.int64),
               "peak_rss_scope": "round", "slurm_job_id": "", "slurm_array_job_id": "", "slurm_array_task_id": ""},
    )
    g = np.random.default_rng(clients * 100 + world)
    written = []
    for r, (seconds, trains) in enumerate(zip(round_s, train_s)):
        trains = np.asarray(trains, dtype=np.float64)
        waits = trains.max() - trains
        attrs = {
            "tau": cfg.federation.tau, "time_train": float(trains.max()), "time_wait": float(waits.max()),
            "time_gather": 0.01 * world, "time_aggregate": 0.02, "time_broadcast": 0.005, "time_merge": 0.001,
            "time_eval": 0.1, "bytes_up": bytes_up, "bytes_down": bytes_down, "clients_aggregated": clients,
            "eval_loss": 5.0 - 0.1 * r, "eval_accuracy": math.nan, "world_size": world,
        }
        if time_round:
            attrs["time_round"] = float(seconds)
        ranks = {
            "time_train": trains, "time_wait": waits,
            "clients": np.array([len(range(k, clients, world)) for k in range(world)], dtype=np.int64),
            "peak_rss_bytes": np.asarray(rss[r] if rss else [500 * 2**20] * world, dtype=np.int64),
            "mpi_bytes_sent": np.asarray(mpi_sent[r] if mpi_sent else [0] * world, dtype=np.int64),
            "mpi_bytes_received": np.zeros(world, dtype=np.int64),
        }
        if gpu is not None:
            ranks["peak_gpu_bytes"] = np.asarray(gpu[r], dtype=np.int64)
        B = g.standard_normal((SHAPE[0], 1)).astype(np.float32)
        A = g.standard_normal((1, SHAPE[1])).astype(np.float32)
        record = storage.RoundRecord(
            index=r, attrs=attrs,
            clients={"id": np.arange(clients, dtype=np.int64), "num_samples": np.full(clients, 16, dtype=np.int64),
                     "rank": np.full(clients, 8, dtype=np.int64), "train_loss": np.full(clients, 5.0)},
            excluded=[], global_factors={MODULE: (B, A, np.array([1.0]), 1, 1.0)}, ranks=ranks,
        )
        if r == 0:
            storage.create_log(path, header, first_round=record)
        else:
            storage.append_round(path, record)
        written.append({"attrs": attrs, "ranks": ranks})
    return written
