"""The simulated time-to-target table: when each clocked run first reached an eval loss, and at what cost."""
from __future__ import annotations

import math

from florist_mpi.analysis import Run
from florist_mpi.report.formatting import format_scaled_bytes, format_table
from florist_mpi.report.stats import has_clock


def time_to_target(runs: list[Run], labels: list[str], target_loss: float | None = None) -> dict | None:
    """When each run with a simulated clock first reached `target_loss` (default: the lowest eval loss
    every such run reaches, i.e. the largest of their best losses); None without two such runs or a target.

    A run reaches the target at the first evaluated round whose eval loss is at or below it; its
    simulated time is that round's sim_clock_s (the clock at the end of the round).
    """
    clocked = [(run, label) for run, label in zip(runs, labels) if has_clock(run)]
    best = [float(run.rounds["eval_loss"].min()) for run, _ in clocked]
    if not clocked or (target_loss is None and (len(clocked) < 2 or not all(math.isfinite(b) for b in best))):
        return None
    target = float(target_loss) if target_loss is not None else max(best)
    return {
        "target_loss": target,
        "chosen": "--target-loss" if target_loss is not None else "the lowest eval loss every run reaches",
        "runs": [_reached(run, label, target) for run, label in clocked],
    }


def _reached(run: Run, label: str, target: float) -> dict:
    """One run's row: the first round at or below `target`, or None/NaN fields when it never got there."""
    frame = run.rounds
    hit = frame[frame["eval_loss"] <= target]
    row = {
        "label": label,
        "run": str(run.path),
        "method": run.method,
        "tau": run.tau,
        "round": None,
        "sim_clock_s": math.nan,
        "rounds": None,
        "bytes_down": None,
    }
    if not hit.empty:
        r = int(hit.index[0])
        row.update(
            round=r,
            sim_clock_s=float(frame.loc[r, "sim_clock_s"]),
            rounds=int((frame.index <= r).sum()),
            bytes_down=int(frame.loc[:r, "bytes_down"].sum()),
        )
    return row


def time_to_target_text(reached: dict) -> str:
    """The table `report` prints under 'Time to reach eval loss X'."""
    rows = [
        [
            row["label"],
            row["method"],
            f"{row['tau']:g}",
            "-" if row["round"] is None else str(row["round"]),
            "-" if row["rounds"] is None else str(row["rounds"]),
            "not reached" if row["round"] is None else f"{row['sim_clock_s']:.2f}",
            "-" if row["bytes_down"] is None else format_scaled_bytes(row["bytes_down"] / 1e6),
        ]
        for row in reached["runs"]
    ]
    table = format_table(["run", "method", "tau", "round", "rounds", "sim time s", "down MB"], rows, left=2)
    return f"Time to reach eval loss {reached['target_loss']:.4f} ({reached['chosen']}; simulated clock)\n" + table
