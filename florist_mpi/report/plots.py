"""The PNG figures of `report --plots`: eval loss/accuracy per round, against downlink bytes and against
the simulated clock (all runs in one figure each; curves that coincide are dashed and named in a
note), and per run the rank heat map, the last round's singular-value spectra and the time per phase
(every run on the same y-scale).

matplotlib is imported inside the functions, so that the text, CSV and JSON forms never load it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from florist_mpi import methods
from florist_mpi.analysis import PHASES, Run
from florist_mpi.report.formatting import byte_unit, short_module_names
from florist_mpi.report.stats import has_accuracy, has_clock, has_round_times, round_times

# Spectra plotted per run.
SPECTRUM_MODULES = 4
# Heatmap cells annotated with their rank up to this many cells.
ANNOTATE_CELLS = 300


def write_plots(runs: list[Run], labels: list[str], out: Path) -> list[Path]:
    """Every figure for these runs into the folder `out`; returns the files written, in order."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written = []
    with plt.rc_context({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "savefig.bbox": "tight"}):
        accuracy = any(has_accuracy(run) for run in runs)
        losses = any(np.isfinite(run.rounds["eval_loss"]).any() for run in runs)
        # Loss figures unless every run measured accuracy only (then they would be empty).
        for metric in [m for m, wanted in ((LOSS, losses or not accuracy), (ACCURACY, accuracy)) if wanted]:
            written.append(save_figure(plot_metric_per_round(runs, labels, metric), out / f"{metric.column}.png"))
            written.append(
                save_figure(plot_metric_vs_downlink(runs, labels, metric), out / f"{metric.column}_vs_downlink.png")
            )
            if any(has_clock(run) for run in runs):
                written.append(
                    save_figure(plot_metric_vs_sim_time(runs, labels, metric), out / f"{metric.column}_vs_sim_time.png")
                )
        top = phase_time_limit(runs)  # every run's phase figure on one y-scale
        for run, label in zip(runs, labels):
            stem = _file_safe(label)
            if run.round_indices:
                written.append(save_figure(plot_rank_heatmap(run, label), out / f"ranks_{stem}.png"))
                written.append(save_figure(plot_spectra(run, label), out / f"spectrum_{stem}.png"))
                written.append(save_figure(plot_phase_times(run, label, top), out / f"phase_times_{stem}.png"))
    return written


def _file_safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)
    return path


def line_colors(count: int):
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


# Two curves coincide on a figure when they share their x values and every y differs by less than this
# fraction of the y-range drawn: then the later one hides the earlier one, and the figure says so.
COINCIDE_FRACTION = 1e-3


@dataclass
class Curve:
    """One run's line on a metric figure."""

    label: str
    color: tuple
    x: np.ndarray
    y: np.ndarray


def coinciding(curves: list[Curve]) -> list[int | None]:
    """For each curve the index of the first earlier curve it coincides with (COINCIDE_FRACTION), else None."""
    values = np.concatenate([c.y for c in curves]) if curves else np.zeros(0)
    span = float(np.ptp(values)) if values.size else 0.0
    tolerance = COINCIDE_FRACTION * span if span > 0 else 1e-12 * max(1.0, float(np.abs(values).max(initial=0)))
    same: list[int | None] = []
    for i, curve in enumerate(curves):
        match = None
        for j in range(i):
            other = curves[j]
            if (same[j] is None and curve.x.shape == other.x.shape and np.array_equal(curve.x, other.x)
                    and np.all(np.abs(curve.y - other.y) <= tolerance)):
                match = j
                break
        same.append(match)
    return same


def _draw_curves(ax, curves: list[Curve]) -> None:
    """Plot the curves with a legend; a curve that coincides with an earlier one is dashed with open
    markers, says which one in its legend entry, and a note under the axes names them."""
    same = coinciding(curves)
    for curve, twin in zip(curves, same):
        if twin is None:
            ax.plot(curve.x, curve.y, marker="o", ms=3.5, color=curve.color, label=curve.label)
        else:
            ax.plot(curve.x, curve.y, marker="s", ms=6, mfc="none", ls="--", color=curve.color,
                    label=f"{curve.label} [same curve as {curves[twin].label.split(' (')[0]}]")
    groups: dict[int, list[str]] = {}
    for i, twin in enumerate(same):
        if twin is not None:
            groups.setdefault(twin, [curves[twin].label.split(" (")[0]]).append(curves[i].label.split(" (")[0])
    if groups:
        text = "; ".join(" = ".join(names) for names in groups.values())
        ax.annotate(f"identical curves, drawn over each other: {text}", xy=(0, -0.16), xycoords="axes fraction",
                    fontsize=7, color="0.3", va="top")
    if curves:
        ax.legend(fontsize=8)


def plot_metric_per_round(runs: list[Run], labels: list[str], metric: Metric = LOSS):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    curves = []
    for run, label, color in zip(runs, labels, line_colors(len(runs))):
        values = run.rounds[metric.column].dropna()
        if values.empty:
            continue
        curves.append(Curve(f"{label} ({run.method}, τ={run.tau:g})", color, values.index.to_numpy(),
                            values.to_numpy(dtype=float)))
        if math.isfinite(_initial(run, metric)):
            ax.axhline(_initial(run, metric), color=color, ls=":", lw=1)
    _draw_curves(ax, curves)
    if not curves:
        _no_data(ax, "no evaluated rounds in these logs")
    dotted = curves and metric.has_initial
    ax.set_title(f"Held-out {metric.name} per round" + (" (dotted: before round 0)" if dotted else ""))
    ax.set_xlabel("round")
    ax.set_ylabel(metric.axis)
    ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def plot_metric_vs_downlink(runs: list[Run], labels: list[str], metric: Metric = LOSS):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    largest = max((float(r.rounds["cum_bytes_down"].max()) for r in runs if r.round_indices), default=0.0)
    scale, unit = byte_unit(largest)
    series = []
    for run, label, color in zip(runs, labels, line_colors(len(runs))):
        frame = run.rounds
        frame = frame[np.isfinite(frame[metric.column])]
        if not frame.empty:
            x = frame["cum_bytes_down"].to_numpy(dtype=float) / scale
            series.append((run, label, color, x, frame[metric.column].to_numpy(dtype=float)))
    positive = [v for *_, x, _ in series for v in x if v > 0]
    log_x = bool(positive) and max(positive) / min(positive) > 100
    origin = False
    curves = []
    for run, label, color, x, y in series:
        if not log_x and math.isfinite(_initial(run, metric)):
            x, y = np.concatenate([[0.0], x]), np.concatenate([[_initial(run, metric)], y])  # before any download
            origin = True
        curves.append(Curve(f"{label} ({run.method}, τ={run.tau:g})", color, x, y))
    _draw_curves(ax, curves)
    if not series:
        _no_data(ax, "no evaluated rounds in these logs")
    elif log_x:
        ax.set_xscale("log")
    ax.set_title(
        f"{metric.name.capitalize()} vs cumulative downlink traffic" + (" (x = 0: before round 0)" if origin else "")
    )
    ax.set_xlabel(f"cumulative downlink, all clients ({unit})")
    ax.set_ylabel(metric.axis)
    return fig


def plot_metric_vs_sim_time(runs: list[Run], labels: list[str], metric: Metric = LOSS):
    """The metric against the simulated clock (sim_clock_s at the end of each evaluated round)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    curves = []
    for run, label, color in zip(runs, labels, line_colors(len(runs))):
        if not has_clock(run):
            continue
        frame = run.rounds
        frame = frame[np.isfinite(frame[metric.column])]
        x, y = frame["sim_clock_s"].to_numpy(dtype=float), frame[metric.column].to_numpy(dtype=float)
        if math.isfinite(_initial(run, metric)):
            x, y = np.concatenate([[0.0], x]), np.concatenate([[_initial(run, metric)], y])
        if len(x):
            curves.append(Curve(f"{label} ({run.method}, τ={run.tau:g})", color, x, y))
    _draw_curves(ax, curves)
    if not curves:
        _no_data(ax, "no evaluated rounds with a simulated clock")
    ax.set_title(f"{metric.name.capitalize()} vs simulated deployment time")
    ax.set_xlabel("simulated time (s, system section: device speeds and links)")
    ax.set_ylabel(metric.axis)
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
    for module, color in zip(modules, line_colors(len(modules))):
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


def phase_time_limit(runs: list[Run]) -> float:
    """The top of the phase figures' y-axis: the tallest round (stacked phases or wall time) of any run."""
    tallest = [0.0]
    for run in runs:
        frame = run.rounds
        if not frame.empty:
            stacked = frame[list(PHASES)].fillna(0.0).sum(axis=1)
            tallest.append(float(np.nanmax(np.maximum(stacked.to_numpy(), round_times(frame).to_numpy()))))
    return 1.08 * max(tallest) or 1.0


def plot_phase_times(run: Run, label: str, top: float | None = None):
    """Stacked phase times per round (each the slowest rank's) and rank 0's wall time of the round;
    `top`: the y-axis limit, the same for every run of a report (phase_time_limit)."""
    import matplotlib.pyplot as plt

    frame = run.rounds
    fig, ax = plt.subplots(figsize=(min(5 + 0.3 * len(frame), 16), 4.2))
    bottom = np.zeros(len(frame))
    x = frame.index.to_numpy()
    for phase, color in zip(PHASES, line_colors(len(PHASES))):
        values = frame[phase].fillna(0.0).to_numpy()
        ax.bar(x, values, bottom=bottom, color=color, label=phase.removeprefix("time_"), width=0.8)
        bottom += values
    what = "time_round" if has_round_times(run) else "sum of phases: log before time_round"
    ax.plot(x, round_times(frame).to_numpy(), ls="none", marker="D", ms=5, color="black",
            label=f"round wall time, rank 0 ({what})")
    ax.set_ylim(0, top or phase_time_limit([run]))
    ax.set_title(f"{label}: time per round by phase (slowest rank per phase)")
    ax.set_xlabel("round")
    ax.set_ylabel("wall time (s)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, title="phase", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
