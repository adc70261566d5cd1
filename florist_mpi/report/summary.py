"""The text report: per run its config essentials, round table, results, phase times and module ranks;
then, over several runs, the comparison and time-to-target tables."""
from __future__ import annotations

import math
from collections import Counter

from florist_mpi import methods
from florist_mpi.analysis import PHASES, Run
from florist_mpi.console import rank_histogram
from florist_mpi.report.comparison import comparison_table
from florist_mpi.report.formatting import (
    byte_unit,
    format_number,
    format_scaled_bytes,
    format_table,
    short_module_names,
)
from florist_mpi.report.stats import (
    has_accuracy,
    has_clock,
    has_round_times,
    round_times,
    run_summary,
    world_sizes_text,
)
from florist_mpi.report.target import time_to_target, time_to_target_text

# Runs with at most this many modules show the per-module rank table without --verbose.
FEW_MODULES = 8
# Histogram entries (LoRA ranks, threads per rank) and host names shown in a header before "...".
FEW_ENTRIES = 8
FEW_HOSTS = 4
# The phase table's rows: the phases of docs/log-format.md, with the wait before the exchange after training.
PHASE_ROWS = ("time_train", "time_wait", *PHASES[1:])


def text_report(runs: list[Run], labels: list[str], verbose: bool = False, target_loss: float | None = None) -> str:
    """What `florist-mpi report` prints without --csv or --json."""
    units = byte_units(runs)
    blocks = [run_text(run, verbose=verbose, units=units) for run in runs]
    if len(runs) > 1:
        blocks.append("Comparison\n" + comparison_table(runs, labels))
    reached = time_to_target(runs, labels, target_loss)
    if reached is not None:
        blocks.append(time_to_target_text(reached))
    return "\n\n".join(blocks)


def byte_units(runs: list[Run]) -> dict[str, tuple[float, str]]:
    """One (divisor, unit) for the up and one for the down columns of every run's table, so that runs
    compare at a glance (chosen for the largest total)."""
    totals = {"up": [0.0], "down": [0.0]}
    for run in runs:
        frame = run.rounds
        totals["up"].append(float(frame["bytes_up"].sum()))
        totals["down"].append(float(frame["bytes_down"].sum()))
    return {key: byte_unit(max(values)) for key, values in totals.items()}


def run_text(run: Run, verbose: bool = False, units: dict[str, tuple[float, str]] | None = None) -> str:
    """One run's block; a run without a completed round stops after its header. `units`: the byte
    units of the up and down columns (byte_units; by default this run's own)."""
    lines = _header_lines(run)
    frame = run.rounds
    if frame.empty:
        lines.append("no completed round yet")
        return "\n".join(lines)
    lines += ["", _round_table(run, units or byte_units([run]))]
    if has_clock(run):
        lines.append(
            f"simulated time (system section): {frame['sim_time_s'].sum():.2f} s in total, median "
            f"{frame['sim_time_s'].median():.2f} s per round (server {frame['sim_server_s'].sum():.3f} s)"
        )
    lines += _result_lines(run_summary(run))
    lines += ["", _phase_table(run)]
    if verbose or len(run.modules) <= FEW_MODULES:
        lines += ["", "global rank per module and round", _module_rank_table(run)]
    else:
        lines += ["", f"({len(run.modules)} modules: per-module global ranks with --verbose)"]
    return "\n".join(lines)


def _header_lines(run: Run) -> list[str]:
    """Path, method and federation, model and LoRA set-up, initial eval loss."""
    cfg = run.config
    fed = cfg.federation
    tau = f"tau {run.tau:g}" if methods.get(run.method).uses_tau else f"tau {run.tau:g} (unused by {run.method})"
    max_rank = f", max rank {fed.max_rank}" if fed.max_rank else ""
    return [
        f"== {run.path} ==",
        f"method {run.method}, {tau}{max_rank} | {run.num_clients} clients, "
        f"{fed.participants_per_round()} per round | {len(run.rounds)}/{cfg.run.rounds} rounds completed | "
        f"{world_sizes_text(run)} MPI rank(s)",
        f"model {cfg.model.name} | LoRA ranks {_lora_ranks(run)}, alpha {cfg.lora.alpha} | "
        f"{len(run.modules)} adapted modules ({', '.join(cfg.lora.target_modules)})",
        f"initial eval loss {format_number(run.initial_eval_loss)}",
    ] + _launch_lines(run)


def _launch_lines(run: Run) -> list[str]:
    """Where the latest launch ran and how long it took to start (logs since those were recorded)."""
    launch = run.launch
    parts = []
    if "time_startup" in launch:
        parts.append(f"start-up {launch['time_startup']:.1f} s")
    if launch.get("hosts"):
        parts.append(host_summary(launch["hosts"]))
    if launch.get("threads_per_rank"):
        parts.append(f"threads per rank {short_histogram(launch['threads_per_rank'])}")
    if launch.get("slurm_job_id"):
        array = launch.get("slurm_array_job_id")
        task = f" (array {array}_{launch.get('slurm_array_task_id', '')})" if array else ""
        parts.append(f"Slurm job {launch['slurm_job_id']}{task}")
    return ["latest launch: " + " | ".join(parts)] if parts else []


def host_summary(hosts: list[str]) -> str:
    """'1 node (n01 ×4)' or '3 nodes (n01 ×8, n02 ×8, n03 ×8)': ranks per host, the first few hosts only."""
    counts = Counter(hosts)
    shown = [f"{host} ×{count}" for host, count in list(counts.items())[:FEW_HOSTS]]
    if len(counts) > FEW_HOSTS:
        shown.append(f"... {len(counts) - FEW_HOSTS} more")
    return f"{len(counts)} node{'s' if len(counts) != 1 else ''} ({', '.join(shown)})"


def short_histogram(values) -> str:
    """rank_histogram ('8 ×10000', '16 ×1, 8 ×2') cut after a few entries, for any number of values."""
    entries = rank_histogram(values).split(", ")
    if len(entries) <= FEW_ENTRIES:
        return ", ".join(entries)
    return ", ".join(entries[:FEW_ENTRIES]) + f", ... ({len(entries)} distinct values)"


def _lora_ranks(run: Run) -> str:
    """'8 (all clients)', or rank ×clients: '16 ×1, 8 ×2, 4 ×3' (short for any number of clients)."""
    lora = run.config.lora
    if lora.ranks is None:
        return f"{lora.rank} (all clients)"
    if len(set(lora.ranks)) == 1:
        return f"{lora.ranks[0]} (all clients)"
    return short_histogram(lora.ranks)


def _round_table(run: Run, units: dict[str, tuple[float, str]]) -> str:
    """One row per completed round, then a total row; accuracy, world size and clock columns when they vary.
    `round s` is the round's wall time on rank 0 (time_round)."""
    frame = run.rounds
    seconds = round_times(frame)
    up_scale, up_unit = units["up"]
    down_scale, down_unit = units["down"]
    show_accuracy = has_accuracy(run)
    show_world = frame["world_size"].nunique() > 1  # resumed on another number of ranks
    show_clock = has_clock(run)
    headers = (
        ["round", "eval loss"]
        + (["eval acc"] if show_accuracy else [])
        + (["MPI ranks"] if show_world else [])
        + ["clients", "excluded", "rank min/mean/max", f"up {up_unit}", f"down {down_unit}", "round s"]
        + (["sim s", "sim clock s"] if show_clock else [])
    )
    rows = []
    for r, row in frame.iterrows():
        rows.append(
            [str(r), format_number(row["eval_loss"])]
            + ([format_number(row["eval_accuracy"], 3)] if show_accuracy else [])
            + ([str(int(row["world_size"]))] if show_world else [])
            + [
                f"{int(row['num_clients'])}/{int(row['num_sampled'])}",
                str(int(row["num_excluded"])),
                f"{int(row['min_rank'])} / {row['mean_rank']:.1f} / {int(row['max_rank'])}",
                format_scaled_bytes(row["bytes_up"] / up_scale),
                format_scaled_bytes(row["bytes_down"] / down_scale),
                f"{seconds[r]:.2f}",
            ]
            + ([f"{row['sim_time_s']:.2f}", f"{row['sim_clock_s']:.2f}"] if show_clock else [])
        )
    blank = [""] * (1 + show_accuracy + show_world)
    rows.append(
        [
            "total",
            *blank,
            "",
            "",
            "",
            format_scaled_bytes(frame["bytes_up"].sum() / up_scale),
            format_scaled_bytes(frame["bytes_down"].sum() / down_scale),
            f"{seconds.sum():.2f}",
        ]
        + ([f"{frame['sim_time_s'].sum():.2f}", ""] if show_clock else [])
    )
    return format_table(headers, rows)


def _result_lines(summary: dict) -> list[str]:
    """Final and best eval loss and accuracy with their rounds, for the metrics the run measured."""
    lines = []
    if math.isfinite(summary["final_eval_loss"]):
        lines.append(
            f"final eval loss {format_number(summary['final_eval_loss'])} (round {summary['final_eval_loss_round']}), "
            f"best {format_number(summary['best_eval_loss'])} (round {summary['best_eval_loss_round']})"
        )
    if math.isfinite(summary["final_eval_accuracy"]):
        lines.append(
            f"final eval accuracy {format_number(summary['final_eval_accuracy'])} "
            f"(round {summary['final_eval_accuracy_round']}), best {format_number(summary['best_eval_accuracy'])} "
            f"(round {summary['best_eval_accuracy_round']})"
        )
    return lines


def _phase_table(run: Run) -> str:
    """Median and total time per phase and its share of the rounds' wall time, then the rounds themselves.

    Each phase is its slowest rank's (the wait: the longest any rank waited for the slowest one to
    finish training), so the shares need not add up to 100%; the round is rank 0's wall time."""
    frame = run.rounds
    seconds = round_times(frame)
    total_time = float(seconds.sum())
    phase_rows = []
    for phase in PHASE_ROWS:
        values = frame[phase].fillna(0.0)
        share = 100.0 * float(values.sum()) / total_time if total_time > 0 else 0.0
        phase_rows.append([phase.removeprefix("time_"), f"{values.median():.3f}", f"{values.sum():.2f}",
                           f"{share:.1f}%"])
    phase_rows.append(["round", f"{seconds.median():.3f}", f"{total_time:.2f}", "100.0%"])
    note = ("phases: the slowest rank's; wait: the longest wait for the slowest rank before the exchange (the\n"
            "other ranks start a round while rank 0 writes the last one, so theirs includes that write); "
            "round: rank 0's wall time (time_round)")
    if not has_round_times(run):
        note += "; rounds logged before time_round existed count the sum of the phases instead"
    return format_table(["phase", "median s/round", "total s", "share of round"], phase_rows) + "\n" + note


def _module_rank_table(run: Run) -> str:
    """The global rank r_g of every module (rows) in every round (columns)."""
    ranks = run.ranks
    names = short_module_names(run.modules)
    module_rows = [[name, *(str(v) for v in ranks.loc[module].tolist())] for name, module in zip(names, run.modules)]
    return format_table(["module", *(str(c) for c in ranks.columns)], module_rows)
