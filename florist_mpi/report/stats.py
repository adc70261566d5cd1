"""The numbers `report` derives from one run: what it measured, its world sizes and its comparison row."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from florist_mpi.analysis import Run


def round_times(frame: pd.DataFrame) -> pd.Series:
    """Each round's wall time: `time_round` (rank 0, from the round's start to its log commit).

    Rounds logged before `time_round` existed fall back to `time_total`, the sum of the phases' maxima
    over ranks, which overstates the round when ranks are uneven (see has_round_times)."""
    return frame["time_round"].where(np.isfinite(frame["time_round"]), frame["time_total"])


def has_round_times(run: Run) -> bool:
    """Whether every round of the run recorded its wall time `time_round` (logs before it did not)."""
    return bool(np.isfinite(run.rounds["time_round"]).all())


def has_clock(run: Run) -> bool:
    """Whether the run was logged with a system section (simulated round times)."""
    return "sim_time_s" in run.rounds.columns and bool(np.isfinite(run.rounds["sim_time_s"]).any())


def has_accuracy(run: Run) -> bool:
    """Whether any round of the run measured an accuracy (eval.kind mmlu)."""
    return bool(np.isfinite(run.rounds["eval_accuracy"]).any())


def world_sizes(run: Run) -> list[int]:
    """MPI world sizes the rounds ran on, in order of first use (the header's value before round 0)."""
    sizes = run.rounds["world_size"].tolist() or [run.world_size]
    return list(dict.fromkeys(int(v) for v in sizes))


def world_sizes_text(run: Run) -> str:
    """'2', or '1→2' for a run resumed on another number of ranks."""
    return "→".join(str(v) for v in world_sizes(run))


def _final_and_best(series: pd.Series, best: str) -> dict:
    """final/best value and their rounds of a metric over its evaluated rounds (NaN/None when none)."""
    finite = series.dropna()
    if finite.empty:
        return {"final": math.nan, "final_round": None, "best": math.nan, "best_round": None}
    index = finite.idxmin() if best == "min" else finite.idxmax()
    return {
        "final": float(finite.iloc[-1]),
        "final_round": int(finite.index[-1]),
        "best": float(finite[index]),
        "best_round": int(index),
    }


def run_summary(run: Run) -> dict:
    """One comparison row: the numbers `report` compares across runs."""
    frame = run.rounds
    loss = _final_and_best(frame["eval_loss"], "min")
    accuracy = _final_and_best(frame["eval_accuracy"], "max")
    sizes = world_sizes(run)
    return {
        "method": run.method,
        "tau": run.tau,
        "world_size": sizes[-1],
        "world_sizes": sizes,
        "num_clients": run.num_clients,
        "clients_per_round": run.config.federation.participants_per_round(),
        "mean_aggregated_clients": float(frame["num_clients"].mean()) if not frame.empty else math.nan,
        "rounds": len(frame),
        "final_eval_loss": loss["final"],
        "final_eval_loss_round": loss["final_round"],
        "best_eval_loss": loss["best"],
        "best_eval_loss_round": loss["best_round"],
        "final_eval_accuracy": accuracy["final"],
        "final_eval_accuracy_round": accuracy["final_round"],
        "best_eval_accuracy": accuracy["best"],
        "best_eval_accuracy_round": accuracy["best_round"],
        "total_bytes_down": int(frame["bytes_down"].sum()) if not frame.empty else 0,
        "total_bytes_up": int(frame["bytes_up"].sum()) if not frame.empty else 0,
        "mean_rank": float(frame["mean_rank"].mean()) if not frame.empty else math.nan,
        "total_time_s": float(round_times(frame).sum()) if not frame.empty else 0.0,
        "median_round_s": float(round_times(frame).median()) if not frame.empty else math.nan,
        "total_sim_time_s": float(frame["sim_time_s"].sum()) if has_clock(run) else math.nan,
    }
