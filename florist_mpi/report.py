"""`florist-mpi report`: summarise run logs as text, CSV or JSON, with optional PNG plots.

    florist-mpi report runs/demo.h5 --plots runs/plots
    florist-mpi report runs/*.h5 --csv > summary.csv

Text (default): per run the config essentials, a per-round table (eval loss, eval accuracy
when the run measured it, clients, global rank min/mean/max, bytes, time), totals and
phase times; the per-module rank table for runs with few modules or with --verbose; with
several runs a comparison table (world size, clients, loss, accuracy, traffic, rank, time).
--csv prints one row per run and round; --json prints one complete document per run
(config, summary, totals, per-round rows with each module's global rank). Both go to
stdout alone, so they can be redirected to a file; messages about plots then go to
stderr. Columns and fields: docs/analysis.md.
"""
from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from florist_mpi import methods
from florist_mpi.analysis import PHASES, Run, open_run
from florist_mpi.errors import UserError

# Runs with at most this many modules show the per-module rank table without --verbose.
FEW_MODULES = 8
# Spectra plotted per run.
SPECTRUM_MODULES = 4
# Heatmap cells annotated with their rank up to this many cells.
ANNOTATE_CELLS = 300


def add_arguments(parser) -> None:
    parser.add_argument("logs", nargs="+", metavar="RUN.h5", help="run logs (run.output of each run)")
    machine = parser.add_mutually_exclusive_group()
    machine.add_argument("--csv", action="store_true", help="print one CSV row per run and round instead of text")
    machine.add_argument(
        "--json",
        action="store_true",
        help="print a JSON document per run (config, summary, totals, rounds, global ranks) instead of text",
    )
    parser.add_argument("--plots", metavar="DIR", help="also write PNG figures into DIR (created if missing)")
    parser.add_argument("--verbose", action="store_true", help="show the per-module global rank table for every run")
    parser.add_argument(
        "--target-loss",
        type=float,
        metavar="LOSS",
        help="eval loss of the simulated time-to-target table (runs with a system section; "
        "default: the lowest loss every such run reaches)",
    )


def main(args) -> int:
    runs = [open_run(path) for path in args.logs]  # every log is checked before anything is printed
    labels = run_labels([run.path for run in runs])
    target_loss = getattr(args, "target_loss", None)
    if target_loss is not None and not (math.isfinite(target_loss) and target_loss > 0):
        raise UserError(f"--target-loss {target_loss:g} is not a positive loss: give e.g. --target-loss 2.5")
    machine = args.csv or args.json
    if args.plots:
        plot_dir = _plot_dir(args.plots)
    if args.csv:
        per_round_rows(runs, labels).to_csv(sys.stdout, index=False, float_format="%.10g")
    elif args.json:
        document = {"runs": [run_document(run, label) for run, label in zip(runs, labels)]}
        reached = time_to_target(runs, labels, target_loss)
        if reached is not None:
            document["time_to_target"] = _jsonable(reached)
        json.dump(document, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(text_report(runs, labels, verbose=args.verbose, target_loss=target_loss))
    if args.plots:
        written = write_plots(runs, labels, plot_dir)
        note = sys.stderr if machine else sys.stdout
        print(f"wrote {len(written)} plots to {plot_dir}/: " + ", ".join(p.name for p in written), file=note)
    return 0


# ------------------------------------------------------------------------ helpers


def run_labels(paths: list[Path]) -> list[str]:
    """Short unique names: the file stem, with as many parent folders as needed to tell runs apart."""
    parts = [Path(p).with_suffix("").parts for p in paths]
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(p) for p in parts):
            break
        depth += 1
    # still equal (the same file given twice): number them
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return unique


def _file_safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def _plot_dir(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise UserError(f"--plots '{path}' exists and is not a directory: give a directory for the PNG files")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"cannot create --plots directory '{path}' ({err.strerror}): choose a writable location"
        ) from None
    return path


def byte_unit(largest: float) -> tuple[float, str]:
    for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if largest >= scale:
            return scale, name
    return 1.0, "B"


def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.{digits}f}"


def _sig(value: float) -> str:
    """A byte amount already scaled to its unit: three significant digits or so."""
    if not math.isfinite(value):
        return "-"
    if value >= 100:
        return f"{value:.1f}"
    if value >= 10:
        return f"{value:.2f}"
    return f"{value:.3f}"


def format_table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Columns padded to their widest cell; the first `left` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]

    def line(cells):
        out = [str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def short_module_names(modules: list[str]) -> list[str]:
    """Drop the dotted prefix every module shares ('model.layers.'), keeping the word before a layer number."""
    if len(modules) < 2:
        return list(modules)
    split = [m.split(".") for m in modules]
    common = 0
    while all(len(s) > common + 1 and s[common] == split[0][common] for s in split):
        common += 1
    if common and any(s[common].isdigit() for s in split):
        common -= 1  # 'layers.3.self_attn.q_proj' rather than '3.self_attn.q_proj'
    return [".".join(s[common:]) for s in split]


def _lora_ranks(run: Run) -> str:
    lora = run.config.lora
    if lora.ranks is None:
        return f"{lora.rank} (all clients)"
    if len(set(lora.ranks)) == 1:
        return f"{lora.ranks[0]} (all clients)"
    shown = lora.ranks if len(lora.ranks) <= 16 else lora.ranks[:16] + ["..."]
    return "[" + ", ".join(str(r) for r in shown) + "]"


# ------------------------------------------------------------------ text output


def text_report(runs: list[Run], labels: list[str], verbose: bool = False, target_loss: float | None = None) -> str:
    blocks = [run_text(run, verbose=verbose) for run in runs]
    if len(runs) > 1:
        blocks.append("Comparison\n" + comparison_table(runs, labels))
    reached = time_to_target(runs, labels, target_loss)
    if reached is not None:
        blocks.append(time_to_target_text(reached))
    return "\n\n".join(blocks)


# ------------------------------------------------------------ simulated clock


def has_clock(run: Run) -> bool:
    """Whether the run was logged with a system section (simulated round times)."""
    return "sim_time_s" in run.rounds.columns and bool(np.isfinite(run.rounds["sim_time_s"]).any())


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
    rows = []
    for run, label in clocked:
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
        rows.append(row)
    return {
        "target_loss": target,
        "chosen": "--target-loss" if target_loss is not None else "the lowest eval loss every run reaches",
        "runs": rows,
    }


def time_to_target_text(reached: dict) -> str:
    rows = [
        [
            row["label"],
            row["method"],
            f"{row['tau']:g}",
            "-" if row["round"] is None else str(row["round"]),
            "-" if row["rounds"] is None else str(row["rounds"]),
            "not reached" if row["round"] is None else f"{row['sim_clock_s']:.2f}",
            "-" if row["bytes_down"] is None else _sig(row["bytes_down"] / 1e6),
        ]
        for row in reached["runs"]
    ]
    table = format_table(["run", "method", "tau", "round", "rounds", "sim time s", "down MB"], rows, left=2)
    return f"Time to reach eval loss {reached['target_loss']:.4f} ({reached['chosen']}; simulated clock)\n" + table


def run_text(run: Run, verbose: bool = False) -> str:
    cfg = run.config
    fed = cfg.federation
    frame = run.rounds
    lines = [f"== {run.path} =="]
    tau = f"tau {run.tau:g}" if methods.get(run.method).uses_tau else f"tau {run.tau:g} (unused by {run.method})"
    max_rank = f", max rank {fed.max_rank}" if fed.max_rank else ""
    lines.append(
        f"method {run.method}, {tau}{max_rank} | {run.num_clients} clients, "
        f"{fed.participants_per_round()} per round | {len(frame)}/{cfg.run.rounds} rounds completed | "
        f"{_world_sizes_text(run)} MPI rank(s)"
    )
    lines.append(
        f"model {cfg.model.name} | LoRA ranks {_lora_ranks(run)}, alpha {cfg.lora.alpha} | "
        f"{len(run.modules)} adapted modules ({', '.join(cfg.lora.target_modules)})"
    )
    lines.append(f"initial eval loss {_num(run.initial_eval_loss)}")
    if frame.empty:
        lines.append("no completed round yet")
        return "\n".join(lines)

    up_scale, up_unit = byte_unit(float(frame["cum_bytes_up"].iloc[-1]))
    down_scale, down_unit = byte_unit(float(frame["cum_bytes_down"].iloc[-1]))
    show_accuracy = has_accuracy(run)
    show_world = frame["world_size"].nunique() > 1  # resumed on another number of ranks
    show_clock = has_clock(run)
    headers = (
        ["round", "eval loss"]
        + (["eval acc"] if show_accuracy else [])
        + (["MPI ranks"] if show_world else [])
        + ["clients", "excluded", "rank min/mean/max", f"up {up_unit}", f"down {down_unit}", "time s"]
        + (["sim s", "sim clock s"] if show_clock else [])
    )
    rows = []
    for r, row in frame.iterrows():
        rows.append(
            [str(r), _num(row["eval_loss"])]
            + ([_num(row["eval_accuracy"], 3)] if show_accuracy else [])
            + ([str(int(row["world_size"]))] if show_world else [])
            + [
                f"{int(row['num_clients'])}/{int(row['num_sampled'])}",
                str(int(row["num_excluded"])),
                f"{int(row['min_rank'])} / {row['mean_rank']:.1f} / {int(row['max_rank'])}",
                _sig(row["bytes_up"] / up_scale),
                _sig(row["bytes_down"] / down_scale),
                f"{row['time_total']:.2f}",
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
            _sig(frame["bytes_up"].sum() / up_scale),
            _sig(frame["bytes_down"].sum() / down_scale),
            f"{frame['time_total'].sum():.2f}",
        ]
        + ([f"{frame['sim_time_s'].sum():.2f}", ""] if show_clock else [])
    )
    lines += ["", format_table(headers, rows)]
    if show_clock:
        lines.append(
            f"simulated time (system section): {frame['sim_time_s'].sum():.2f} s in total, median "
            f"{frame['sim_time_s'].median():.2f} s per round (server {frame['sim_server_s'].sum():.3f} s)"
        )

    summary = run_summary(run)
    if math.isfinite(summary["final_eval_loss"]):
        lines.append(
            f"final eval loss {_num(summary['final_eval_loss'])} (round {summary['final_eval_loss_round']}), "
            f"best {_num(summary['best_eval_loss'])} (round {summary['best_eval_loss_round']})"
        )
    if math.isfinite(summary["final_eval_accuracy"]):
        lines.append(
            f"final eval accuracy {_num(summary['final_eval_accuracy'])} "
            f"(round {summary['final_eval_accuracy_round']}), best {_num(summary['best_eval_accuracy'])} "
            f"(round {summary['best_eval_accuracy_round']})"
        )

    phase_rows = []
    total_time = float(frame["time_total"].sum())
    for phase in PHASES:
        values = frame[phase].fillna(0.0)
        share = 100.0 * float(values.sum()) / total_time if total_time > 0 else 0.0
        phase_rows.append(
            [phase.removeprefix("time_"), f"{values.median():.3f}", f"{values.sum():.2f}", f"{share:.1f}%"]
        )
    lines += ["", format_table(["phase", "median s/round", "total s", "share"], phase_rows)]

    if verbose or len(run.modules) <= FEW_MODULES:
        ranks = run.ranks
        names = short_module_names(run.modules)
        module_rows = [
            [name, *(str(v) for v in ranks.loc[module].tolist())] for name, module in zip(names, run.modules)
        ]
        lines += [
            "",
            "global rank per module and round",
            format_table(["module", *(str(c) for c in ranks.columns)], module_rows),
        ]
    else:
        lines += ["", f"({len(run.modules)} modules: per-module global ranks with --verbose)"]
    return "\n".join(lines)


def has_accuracy(run: Run) -> bool:
    """Whether any round of the run measured an accuracy (eval.kind mmlu)."""
    return bool(np.isfinite(run.rounds["eval_accuracy"]).any())


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


def _world_sizes(run: Run) -> list[int]:
    """MPI world sizes the rounds ran on, in order of first use (the header's value before round 0)."""
    sizes = run.rounds["world_size"].tolist() or [run.world_size]
    return list(dict.fromkeys(int(v) for v in sizes))


def _world_sizes_text(run: Run) -> str:
    return "→".join(str(v) for v in _world_sizes(run))


def run_summary(run: Run) -> dict:
    """One comparison row: the numbers `report` compares across runs."""
    frame = run.rounds
    loss = _final_and_best(frame["eval_loss"], "min")
    accuracy = _final_and_best(frame["eval_accuracy"], "max")
    sizes = _world_sizes(run)
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
        "total_time_s": float(frame["time_total"].sum()) if not frame.empty else 0.0,
        "total_sim_time_s": float(frame["sim_time_s"].sum()) if has_clock(run) else math.nan,
    }


def comparison_table(runs: list[Run], labels: list[str]) -> str:
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
                _world_sizes_text(run),
                str(s["num_clients"]),
                str(s["clients_per_round"]),
                str(s["rounds"]),
                _num(s["final_eval_loss"]),
                _num(s["best_eval_loss"]),
            ]
            + ([_num(s["final_eval_accuracy"]), _num(s["best_eval_accuracy"])] if accuracy else [])
            + [
                _sig(s["total_bytes_down"] / down_scale),
                _sig(s["total_bytes_up"] / up_scale),
                _num(s["mean_rank"], 2),
                f"{s['total_time_s']:.1f}",
            ]
            + ([_num(s["total_sim_time_s"], 1)] if clock else [])
        )
    headers = (
        ["run", "method", "tau", "MPI ranks", "clients", "per round", "rounds", "final loss", "best loss"]
        + (["final acc", "best acc"] if accuracy else [])
        + [f"down {down_unit}", f"up {up_unit}", "mean rank", "time s"]
        + (["sim time s"] if clock else [])
    )
    return format_table(headers, rows, left=2)


# ---------------------------------------------------------------- machine output


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


def run_totals(run: Run) -> dict:
    frame = run.rounds
    totals = {
        "rounds": len(frame),
        "bytes_up": int(frame["bytes_up"].sum()),
        "bytes_down": int(frame["bytes_down"].sum()),
        "time_total": float(frame["time_total"].sum()),
    }
    totals.update({phase: float(frame[phase].fillna(0.0).sum()) for phase in PHASES})
    if has_clock(run):
        totals["sim_time_s"] = float(frame["sim_time_s"].sum())
    return totals


def run_document(run: Run, label: str) -> dict:
    """Everything `report` knows about one run, as plain JSON values (NaN becomes null)."""
    ranks, energies = run.ranks, run.energies
    rounds = []
    for r, row in run.rounds.iterrows():
        entry = {"round": int(r), **row.to_dict()}
        entry["global_rank"] = {m: int(ranks.at[m, r]) for m in run.modules}
        entry["global_energy"] = {m: float(energies.at[m, r]) for m in run.modules}
        rounds.append(entry)
    return _jsonable(
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


def _jsonable(value):
    """numpy scalars to Python numbers and non-finite floats to None, recursively."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# -------------------------------------------------------------------------- plots


def write_plots(runs: list[Run], labels: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written = []
    with plt.rc_context({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "savefig.bbox": "tight"}):
        accuracy = any(has_accuracy(run) for run in runs)
        losses = any(np.isfinite(run.rounds["eval_loss"]).any() for run in runs)
        # Loss figures unless every run measured accuracy only (then they would be empty).
        for metric in [m for m, wanted in ((LOSS, losses or not accuracy), (ACCURACY, accuracy)) if wanted]:
            written.append(_save(plot_metric_per_round(runs, labels, metric), out / f"{metric.column}.png"))
            written.append(
                _save(plot_metric_vs_downlink(runs, labels, metric), out / f"{metric.column}_vs_downlink.png")
            )
            if any(has_clock(run) for run in runs):
                written.append(
                    _save(plot_metric_vs_sim_time(runs, labels, metric), out / f"{metric.column}_vs_sim_time.png")
                )
        for run, label in zip(runs, labels):
            stem = _file_safe(label)
            if run.round_indices:
                written.append(_save(plot_rank_heatmap(run, label), out / f"ranks_{stem}.png"))
                written.append(_save(plot_spectra(run, label), out / f"spectrum_{stem}.png"))
                written.append(_save(plot_phase_times(run, label), out / f"phase_times_{stem}.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)
    return path


def _colors(count: int):
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if count <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(count)]


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


@dataclass(frozen=True)
class Metric:
    """An evaluation column as the figures show it."""

    column: str
    name: str
    axis: str
    has_initial: bool  # the log holds its value before round 0


LOSS = Metric("eval_loss", "eval loss", "eval loss (nats/token)", True)
ACCURACY = Metric("eval_accuracy", "eval accuracy", "eval accuracy (MMLU, fraction correct)", False)


def _initial(run: Run, metric: Metric) -> float:
    return run.initial_eval_loss if metric.has_initial else math.nan


def plot_metric_per_round(runs: list[Run], labels: list[str], metric: Metric = LOSS):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = 0
    for run, label, color in zip(runs, labels, _colors(len(runs))):
        values = run.rounds[metric.column].dropna()
        if values.empty:
            continue
        ax.plot(
            values.index, values.values, marker="o", ms=3.5, color=color, label=f"{label} ({run.method}, τ={run.tau:g})"
        )
        if math.isfinite(_initial(run, metric)):
            ax.axhline(_initial(run, metric), color=color, ls=":", lw=1)
        drawn += 1
    if not drawn:
        _no_data(ax, "no evaluated rounds in these logs")
    dotted = drawn and metric.has_initial
    ax.set_title(f"Held-out {metric.name} per round" + (" (dotted: before round 0)" if dotted else ""))
    ax.set_xlabel("round")
    ax.set_ylabel(metric.axis)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if drawn:
        ax.legend(fontsize=8)
    return fig


def plot_metric_vs_downlink(runs: list[Run], labels: list[str], metric: Metric = LOSS):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    largest = max((float(r.rounds["cum_bytes_down"].max()) for r in runs if r.round_indices), default=0.0)
    scale, unit = byte_unit(largest)
    series = []
    for run, label, color in zip(runs, labels, _colors(len(runs))):
        frame = run.rounds
        frame = frame[np.isfinite(frame[metric.column])]
        if not frame.empty:
            x = frame["cum_bytes_down"].to_numpy(dtype=float) / scale
            series.append((run, label, color, x, frame[metric.column].to_numpy(dtype=float)))
    positive = [v for *_, x, _ in series for v in x if v > 0]
    log_x = bool(positive) and max(positive) / min(positive) > 100
    origin = False
    for run, label, color, x, y in series:
        if not log_x and math.isfinite(_initial(run, metric)):
            x, y = np.concatenate([[0.0], x]), np.concatenate([[_initial(run, metric)], y])  # before any download
            origin = True
        ax.plot(x, y, marker="o", ms=3.5, color=color, label=f"{label} ({run.method}, τ={run.tau:g})")
    if not series:
        _no_data(ax, "no evaluated rounds in these logs")
    elif log_x:
        ax.set_xscale("log")
    ax.set_title(
        f"{metric.name.capitalize()} vs cumulative downlink traffic" + (" (x = 0: before round 0)" if origin else "")
    )
    ax.set_xlabel(f"cumulative downlink, all clients ({unit})")
    ax.set_ylabel(metric.axis)
    if series:
        ax.legend(fontsize=8)
    return fig


def plot_metric_vs_sim_time(runs: list[Run], labels: list[str], metric: Metric = LOSS):
    """The metric against the simulated clock (sim_clock_s at the end of each evaluated round)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = 0
    for run, label, color in zip(runs, labels, _colors(len(runs))):
        if not has_clock(run):
            continue
        frame = run.rounds
        frame = frame[np.isfinite(frame[metric.column])]
        x, y = frame["sim_clock_s"].to_numpy(dtype=float), frame[metric.column].to_numpy(dtype=float)
        if math.isfinite(_initial(run, metric)):
            x, y = np.concatenate([[0.0], x]), np.concatenate([[_initial(run, metric)], y])
        if len(x):
            ax.plot(x, y, marker="o", ms=3.5, color=color, label=f"{label} ({run.method}, τ={run.tau:g})")
            drawn += 1
    if not drawn:
        _no_data(ax, "no evaluated rounds with a simulated clock")
    ax.set_title(f"{metric.name.capitalize()} vs simulated deployment time")
    ax.set_xlabel("simulated time (s, system section: device speeds and links)")
    ax.set_ylabel(metric.axis)
    if drawn:
        ax.legend(fontsize=8)
    return fig


def plot_rank_heatmap(run: Run, label: str):
    import matplotlib.pyplot as plt

    ranks = run.ranks
    names = short_module_names(run.modules)
    count_m, count_r = ranks.shape
    fig, ax = plt.subplots(figsize=(min(4 + 0.35 * count_r, 16), min(2.2 + 0.2 * count_m, 24)))
    image = ax.imshow(
        ranks.to_numpy(),
        aspect="auto",
        cmap="viridis",
        interpolation="nearest",
        vmin=0,
        vmax=max(1, int(ranks.to_numpy().max())),
    )
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("global rank r_g")
    if count_m * count_r <= ANNOTATE_CELLS:
        values = ranks.to_numpy()
        threshold = 0.6 * max(1, values.max())
        for i in range(count_m):
            for j in range(count_r):
                ax.text(
                    j,
                    i,
                    str(values[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if values[i, j] > threshold else "white",
                )
    ax.set_yticks(range(count_m))
    ax.set_yticklabels(names, fontsize=max(5, min(9, int(500 / max(count_m, 1) / 4))))
    step = max(1, count_r // 20)
    ax.set_xticks(range(0, count_r, step))
    ax.set_xticklabels([str(c) for c in ranks.columns[::step]])
    ax.grid(False)
    ax.set_title(f"{label}: global rank per module ({run.method}, τ={run.tau:g})")
    ax.set_xlabel("round")
    ax.set_ylabel("adapted module")
    return fig


def _spectrum_modules(run: Run, round_index: int) -> list[str]:
    """A few modules spread over the range of global ranks of the round (lowest to highest)."""
    ranks = run.ranks[round_index]
    order = sorted(run.modules, key=lambda m: (ranks[m], run.modules.index(m)))
    if len(order) <= SPECTRUM_MODULES:
        return order
    picks = np.linspace(0, len(order) - 1, SPECTRUM_MODULES).round().astype(int)
    return [order[i] for i in sorted(set(picks.tolist()))]


def plot_spectra(run: Run, label: str):
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    last = run.last_round
    modules = _spectrum_modules(run, last)
    spectra = run.spectra(last)
    ranks = run.ranks[last]
    names = dict(zip(run.modules, short_module_names(run.modules)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    florist = methods.get(run.method).uses_tau  # its rank was cut at τ: mark τ on the energy plot
    handles = []
    for module, color in zip(modules, _colors(len(modules))):
        sv = spectra[module]
        energy = sv.astype(np.float64) ** 2
        total = energy.sum()
        if total <= 0 or sv.size == 0:
            continue
        share = np.maximum(energy / total, 1e-16)  # exact zeros cannot sit on a log axis
        index = np.arange(1, sv.size + 1)
        r_g = int(ranks[module])
        name = f"{names[module]} (r_g={r_g})"
        handles += left.semilogy(index, share, marker="o", ms=3, color=color, label=name)
        right.plot(index, np.cumsum(energy) / total, marker="o", ms=3, color=color)
        for ax in (left, right):
            ax.axvline(r_g + 0.5, color=color, ls="--", lw=1)
    if handles:
        handles.append(Line2D([], [], color="0.4", ls="--", lw=1, label="cut: first r_g kept"))
    if florist:
        handles.append(right.axhline(run.tau, color="black", ls=":", lw=1.2, label=f"τ = {run.tau:g}"))
    if not handles:
        _no_data(left, "all spectra are zero")
    left.set_title("energy share per singular value")
    left.set_xlabel("singular value index i")
    left.set_ylabel(r"$\sigma_i^2 \,/\, \sum_j \sigma_j^2$ (log scale)")
    right.set_title("cumulative energy")
    right.set_xlabel("number of singular values kept k")
    right.set_ylabel(r"$\sum_{i \leq k} \sigma_i^2 \,/\, \sum_j \sigma_j^2$")
    right.set_ylim(0, 1.05)
    for ax in (left, right):
        ax.xaxis.get_major_locator().set_params(integer=True)
    if handles:
        right.legend(handles=handles, fontsize=7, loc="lower right")
    how = f"FLoRIST, τ={run.tau:g}" if florist else f"{run.method}: rank not chosen by τ"
    fig.suptitle(f"{label}: singular-value spectra of the global update, round {last} ({how})")
    fig.tight_layout()
    return fig


def plot_phase_times(run: Run, label: str):
    import matplotlib.pyplot as plt

    frame = run.rounds
    fig, ax = plt.subplots(figsize=(min(5 + 0.3 * len(frame), 16), 4.2))
    bottom = np.zeros(len(frame))
    x = frame.index.to_numpy()
    for phase, color in zip(PHASES, _colors(len(PHASES))):
        values = frame[phase].fillna(0.0).to_numpy()
        ax.bar(x, values, bottom=bottom, color=color, label=phase.removeprefix("time_"), width=0.8)
        bottom += values
    ax.set_title(f"{label}: time per round by phase")
    ax.set_xlabel("round")
    ax.set_ylabel("wall time (s)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, title="phase", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
