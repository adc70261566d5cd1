"""The printed forms of `report --scaling`: text tables, one CSV row per log, and the JSON document.

Units are the same throughout: times in seconds, ratios as plain numbers, and one byte unit per table
(chosen for its largest value), so that points compare at a glance. Columns and fields: docs/analysis.md.
"""
from __future__ import annotations

import math

import pandas as pd

from florist_mpi.report.documents import jsonable
from florist_mpi.report.formatting import byte_unit, format_scaled_bytes, format_table
from florist_mpi.report.scaling import SHARE_PHASES, Point, RunFigures, Study

DEFINITIONS = {
    "round_time": "rank 0's wall time of a round (time_round), the median over a log's rounds used",
    "speedup": "t(smallest world) / t(this world) among logs with the same num_clients; t of the smallest world "
               "is the mean over its repeats",
    "efficiency": "speedup / (world_size / smallest world_size)",
    "weak_efficiency": "t(smallest world) / t(this world) among logs with the same clients per rank "
                       "(clients_per_round / world_size)",
    "load_imbalance": "max / mean over ranks of ranks/time_train, median over the rounds used",
    "phase_share": "a phase's time (its slowest rank's) summed over the rounds used / the rounds' time_round; "
                   "other = 1 - the phases; time_wait is not part of that sum",
    "mean_std": "points: mean and sample standard deviation over repeats",
}


def _seconds(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.2f}" if value < 100 else f"{value:.1f}"


def _ratio(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "-"


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%" if math.isfinite(value) else "-"


def _with_std(point: Point, name: str, form, scale: float = 1.0) -> str:
    """'0.812' for one repeat, '0.812 ± 0.021' over several: the std with the mean's decimals
    (`form` formats a value, `scale` divides both first)."""
    mean, std = point.mean[name], point.std[name]
    shown = form(mean / scale)
    if not math.isfinite(std) or not math.isfinite(mean):
        return shown
    decimals = len(shown.split(".", 1)[1]) if "." in shown else 0
    return f"{shown} ± {std / scale:.{decimals}f}"


def _scaled(value: float) -> str:
    return format_scaled_bytes(value) if math.isfinite(value) else "-"


def _unit_of(values) -> tuple[float, str]:
    finite = [v for v in values if math.isfinite(v)]
    return byte_unit(max(finite, default=0.0))


# ------------------------------------------------------------------ text


def scaling_text(study: Study) -> str:
    """What `report --scaling` prints without --csv or --json."""
    blocks = [_header(study)]
    if study.strong_groups():
        blocks.append(_strong_table(study))
    else:
        blocks.append("Strong scaling: no number of clients was run on two world sizes or more (speed-up needs a "
                      "reference): add pairs such as C:1 C:2 for one C")
    if study.weak_groups():
        blocks.append(_weak_table(study))
    blocks += [_resources_table(study), _phase_table(study), _traffic_table(study), _runs_table(study)]
    return "\n\n".join(blocks)


def _header(study: Study) -> str:
    config = study.config
    fed, lora = config["federation"], config["lora"]
    rank = lora["rank"] if lora.get("ranks") is None else "per client"
    rounds = sorted({len(f.rounds_used) for f in study.runs})
    used = "all rounds but each log's first, the warm-up" if study.skip_first_round else "all rounds"
    return "\n".join([
        f"Scaling study: {len(study.runs)} logs, {len(study.points)} points (clients x MPI ranks) | method "
        f"{fed['method']}, tau {fed['tau']:g} | model {config['model']['name']} | LoRA rank {rank} | "
        f"{'-'.join(map(str, rounds))} round(s) used per log",
        f"round time: rank 0's wall time per round (time_round), the median over each log's rounds ({used}); "
        "a point is the mean ± std over its repeats",
    ])


def _strong_table(study: Study) -> str:
    rows = []
    for clients, points in study.strong_groups().items():
        for point in points:
            rows.append([str(clients), str(point.world_size), str(point.runs[0].num_nodes), str(len(point.runs)),
                         _with_std(point, "median_round_s", _seconds), _with_std(point, "speedup", _ratio),
                         _with_std(point, "efficiency", _ratio)])
    title = ("Strong scaling (same clients, more MPI ranks): speed-up = t(smallest world) / t(this world), "
             "efficiency = speed-up / (world / smallest world)")
    headers = ["clients", "MPI ranks", "nodes", "repeats", "median round s", "speed-up", "efficiency"]
    return title + "\n" + format_table(headers, rows)


def _weak_table(study: Study) -> str:
    rows = []
    for per_rank, points in study.weak_groups().items():
        for point in points:
            rows.append([f"{float(per_rank):g}", str(point.num_clients), str(point.world_size), str(len(point.runs)),
                         _with_std(point, "median_round_s", _seconds), _with_std(point, "weak_efficiency", _ratio)])
    title = "Weak scaling (same clients per rank): efficiency = t(smallest world) / t(this world)"
    headers = ["clients/rank", "clients", "MPI ranks", "repeats", "median round s", "efficiency"]
    return title + "\n" + format_table(headers, rows)


def _resources_table(study: Study) -> str:
    scale, unit = _unit_of([p.mean["peak_rss_bytes_max"] for p in study.points])
    gpu = any(math.isfinite(p.mean["peak_gpu_bytes_max"]) for p in study.points)
    gpu_scale, gpu_unit = _unit_of([p.mean["peak_gpu_bytes_max"] for p in study.points])
    rows = []
    for point in study.points:
        rows.append([str(point.num_clients), str(point.world_size), _with_std(point, "load_imbalance", _ratio),
                     _with_std(point, "peak_rss_bytes_max", _scaled, scale),
                     _with_std(point, "peak_rss_bytes_mean", _scaled, scale)]
                    + ([_with_std(point, "peak_gpu_bytes_max", _scaled, gpu_scale)] if gpu else [])
                    + [_with_std(point, "time_startup_s", _seconds)])
    scope = {"round": "each round's own peak", "process": "peaks since the process started"}.get(
        study.peak_rss_scope, "peak resident memory")
    title = (f"Load and memory per rank: imbalance = max / mean over ranks of the training time (1: even); "
             f"peak RSS ({scope}): the largest rank's and the mean over ranks")
    headers = (["clients", "MPI ranks", "imbalance", f"peak RSS max {unit}", f"peak RSS mean {unit}"]
               + ([f"peak GPU max {gpu_unit}"] if gpu else []) + ["start-up s"])
    return title + "\n" + format_table(headers, rows)


def _phase_table(study: Study) -> str:
    rows = []
    for point in study.points:
        rows.append([str(point.num_clients), str(point.world_size), _seconds(point.mean["median_round_s"])]
                    + [_percent(point.mean[f"share:{phase}"]) for phase in (*SHARE_PHASES, "other", "time_wait")])
    title = ("Phase shares of the round time (each phase its slowest rank's; other = the rest: sampling, barriers, "
             "collecting the figures, below 0 when maxima of different ranks overlap;\n"
             "wait: the longest wait for the slowest rank before the exchange, not part of the sum)")
    names = [p.removeprefix("time_") for p in SHARE_PHASES]
    return title + "\n" + format_table(["clients", "MPI ranks", "median round s", *names, "other", "wait"], rows)


def _traffic_table(study: Study) -> str:
    names = ("mpi_bytes_per_round", "sim_bytes_up_per_round", "sim_bytes_down_per_round")
    scale, unit = _unit_of([p.mean[n] for p in study.points for n in names])
    rows = [[str(p.num_clients), str(p.world_size), *(_with_std(p, n, _scaled, scale) for n in names)]
            for p in sorted(study.points, key=lambda p: (p.world_size, p.num_clients))]
    title = ("Traffic per round vs clients: MPI (bytes all ranks sent, the simulation's own traffic) and simulated "
             "federated bytes (uploads of the aggregated clients, downloads of all clients)")
    headers = ["clients", "MPI ranks", f"MPI {unit}", f"simulated up {unit}", f"simulated down {unit}"]
    return title + "\n" + format_table(headers, rows)


def _runs_table(study: Study) -> str:
    scale, unit = _unit_of([f.peak_rss_bytes_max for f in study.runs])
    rows = [[f.label, str(f.num_clients), str(f.world_size), str(f.repeat), str(len(f.rounds_used)),
             _seconds(f.median_round_s), _ratio(f.speedup), _ratio(f.efficiency), _ratio(f.weak_efficiency),
             _ratio(f.load_imbalance), _scaled(f.peak_rss_bytes_max / scale)] for f in study.runs]
    headers = ["log", "clients", "MPI ranks", "repeat", "rounds", "median round s", "speed-up", "efficiency",
               "weak eff.", "imbalance", f"peak RSS {unit}"]
    return "Logs\n" + format_table(headers, rows)


# ------------------------------------------------------------------ CSV and JSON


def run_row(f: RunFigures) -> dict:
    """One log's numbers, as the CSV row and the JSON `runs` entry show them (bytes in bytes, times in s)."""
    row = {
        "run": f.path,
        "label": f.label,
        "world_size": f.world_size,
        "num_clients": f.num_clients,
        "clients_per_round": f.clients_per_round,
        "clients_per_rank": float(f.clients_per_rank),
        "repeat": f.repeat,
        "num_nodes": f.num_nodes,
        "rounds_used": len(f.rounds_used),
        "median_round_s": f.median_round_s,
        "mean_round_s": f.mean_round_s,
        "speedup": f.speedup,
        "efficiency": f.efficiency,
        "weak_efficiency": f.weak_efficiency,
        "strong_reference_world": f.strong_reference_world,
        "weak_reference_world": f.weak_reference_world,
        "load_imbalance": f.load_imbalance,
        "peak_rss_bytes_max": f.peak_rss_bytes_max,
        "peak_rss_bytes_mean": f.peak_rss_bytes_mean,
        "peak_gpu_bytes_max": f.peak_gpu_bytes_max,
        "mpi_bytes_per_round": f.mpi_bytes_per_round,
        "sim_bytes_up_per_round": f.sim_bytes_up_per_round,
        "sim_bytes_down_per_round": f.sim_bytes_down_per_round,
        "time_startup_s": f.time_startup_s,
    }
    row.update({f"{phase}_median_s": value for phase, value in f.phase_s.items()})
    row.update({f"share_{phase.removeprefix('time_')}": value for phase, value in f.phase_share.items()})
    return row


def scaling_rows(study: Study) -> pd.DataFrame:
    """What --csv prints: one row per log (run_row)."""
    return pd.DataFrame([run_row(f) for f in study.runs])


def scaling_document(study: Study) -> dict:
    """What --json prints: the study's definitions, one entry per log (`runs`) and per point (`points`)."""
    runs = []
    for f in study.runs:
        runs.append({**run_row(f), "rounds": f.rounds_used})
    points = [{"num_clients": p.num_clients, "world_size": p.world_size, "repeats": len(p.runs),
               "runs": [f.label for f in p.runs], "mean": p.mean, "std": p.std} for p in study.points]
    study_info = {
        "skip_first_round": study.skip_first_round,
        "peak_rss_scope": study.peak_rss_scope,
        "definitions": DEFINITIONS,
        "config": study.config,
    }
    return jsonable({"study": study_info, "runs": runs, "points": points})
