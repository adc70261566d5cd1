"""The machine-readable forms of `report`: per-round rows (--csv) and one JSON document per run (--json).

Columns and fields: docs/analysis.md.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from florist_mpi.analysis import PHASES, Run
from florist_mpi.report.stats import has_clock, round_times, run_summary
from florist_mpi.report.target import time_to_target


def per_round_rows(runs: list[Run], labels: list[str]) -> pd.DataFrame:
    """Every completed round of every run, run-level columns first (`run` is the path as given).

    One row per run and round; the columns are listed in docs/analysis.md.
    """
    frames = []
    for run, label in zip(runs, labels):
        frame = run.rounds.reset_index()
        frame.insert(0, "run", str(run.path))
        frame.insert(1, "label", label)
        frame.insert(2, "method", run.method)
        frame.insert(3, "run_tau", run.tau)
        frame.insert(4, "total_clients", run.num_clients)
        frames.append(frame)
    frames = [f for f in frames if not f.empty] or frames[:1]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def report_document(runs: list[Run], labels: list[str], target_loss: float | None = None) -> dict:
    """What --json prints: {"runs": [document, ...]}, plus "time_to_target" when the text shows that table."""
    document = {"runs": [run_document(run, label) for run, label in zip(runs, labels)]}
    reached = time_to_target(runs, labels, target_loss)
    if reached is not None:
        document["time_to_target"] = jsonable(reached)
    return document


def run_document(run: Run, label: str) -> dict:
    """Everything `report` knows about one run, as plain JSON values (NaN becomes null)."""
    ranks, energies = run.ranks, run.energies
    rounds = []
    for r, row in run.rounds.iterrows():
        entry = {"round": int(r), **row.to_dict()}
        entry["global_rank"] = {m: int(ranks.at[m, r]) for m in run.modules}
        entry["global_energy"] = {m: float(energies.at[m, r]) for m in run.modules}
        rounds.append(entry)
    return jsonable(
        {
            "run": str(run.path),
            "label": label,
            "method": run.method,
            "tau": run.tau,
            "num_clients": run.num_clients,
            "world_size": run.world_size,
            "created": run.created,
            "versions": run.versions,
            "initial_eval_loss": run.initial_eval_loss,
            "modules": [
                {"name": m, "out_features": run.module_shapes[m][0], "in_features": run.module_shapes[m][1]}
                for m in run.modules
            ],
            "config": run.config.model_dump(mode="json"),
            "summary": run_summary(run),
            "totals": run_totals(run),
            "rounds": rounds,
        }
    )


def run_totals(run: Run) -> dict:
    """Rounds, bytes and time per phase summed over the run (and the simulated total with a clock).

    `time_round`: the rounds' wall time on rank 0 (for rounds logged before it existed, their
    `time_total`); `time_total`: the sum of the phases' maxima over ranks."""
    frame = run.rounds
    totals = {
        "rounds": len(frame),
        "bytes_up": int(frame["bytes_up"].sum()),
        "bytes_down": int(frame["bytes_down"].sum()),
        "time_round": float(round_times(frame).sum()),
        "time_total": float(frame["time_total"].sum()),
    }
    totals.update({phase: float(frame[phase].fillna(0.0).sum()) for phase in (*PHASES, "time_wait")})
    if has_clock(run):
        totals["sim_time_s"] = float(frame["sim_time_s"].sum())
    return totals


def jsonable(value):
    """numpy scalars to Python numbers and non-finite floats to None, recursively."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
