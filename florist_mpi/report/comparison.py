"""The comparison table `report` prints under several runs: one row per run from its run_summary."""
from __future__ import annotations

from florist_mpi.analysis import Run
from florist_mpi.report.formatting import byte_unit, format_number, format_scaled_bytes, format_table
from florist_mpi.report.stats import has_accuracy, has_clock, run_summary, world_sizes_text


def comparison_table(runs: list[Run], labels: list[str]) -> str:
    """World size, clients, final/best loss (and accuracy), traffic, mean rank and round times of each run
(rank 0's wall time per round, time_round: the median round and the total over rounds)."""
    summaries = [run_summary(run) for run in runs]
    accuracy = any(has_accuracy(run) for run in runs)
    clock = any(has_clock(run) for run in runs)
    down_scale, down_unit = byte_unit(max(s["total_bytes_down"] for s in summaries))
    up_scale, up_unit = byte_unit(max(s["total_bytes_up"] for s in summaries))
    rows = []
    for run, label, s in zip(runs, labels, summaries):
        rows.append(
            [
                label,
                s["method"],
                f"{s['tau']:g}",
                world_sizes_text(run),
                str(s["num_clients"]),
                str(s["clients_per_round"]),
                str(s["rounds"]),
                format_number(s["final_eval_loss"]),
                format_number(s["best_eval_loss"]),
            ]
            + ([format_number(s["final_eval_accuracy"]), format_number(s["best_eval_accuracy"])] if accuracy else [])
            + [
                format_scaled_bytes(s["total_bytes_down"] / down_scale),
                format_scaled_bytes(s["total_bytes_up"] / up_scale),
                format_number(s["mean_rank"], 2),
                format_number(s["median_round_s"], 2),
                f"{s['total_time_s']:.1f}",
            ]
            + ([format_number(s["total_sim_time_s"], 1)] if clock else [])
        )
    headers = (
        ["run", "method", "tau", "MPI ranks", "clients", "per round", "rounds", "final loss", "best loss"]
        + (["final acc", "best acc"] if accuracy else [])
        + [f"down {down_unit}", f"up {up_unit}", "mean rank", "median round s", "total s"]
        + (["sim time s"] if clock else [])
    )
    return format_table(headers, rows, left=2)
