"""The PNG figures of `report --scaling --plots DIR`.

- scaling_speedup.png: strong-scaling speed-up against MPI ranks, one line per number of clients, with
  the ideal (linear) speed-up; error bars are the standard deviation over repeats.
- scaling_efficiency.png: strong-scaling efficiency per number of clients and, where a study has them,
  weak-scaling efficiency per clients per rank (dashed), against MPI ranks; 1 is ideal.
- scaling_phases.png: every point's median phase times stacked, and its median round time, on one axis
  (one shared y-scale for all points).
- scaling_vs_clients.png: median round time, peak resident memory per rank and the bytes per round
  (MPI and simulated) against the number of clients, one line per world size.

matplotlib is imported inside the functions, so that the text, CSV and JSON forms never load it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from florist_mpi.report.formatting import byte_unit
from florist_mpi.report.plots import line_colors, save_figure
from florist_mpi.report.scaling import SHARE_PHASES, Point, Study


def write_scaling_plots(study: Study, out: Path) -> list[Path]:
    """Every scaling figure into the folder `out`; returns the files written, in order."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    with plt.rc_context({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "savefig.bbox": "tight"}):
        return [
            save_figure(plot_speedup(study), out / "scaling_speedup.png"),
            save_figure(plot_efficiency(study), out / "scaling_efficiency.png"),
            save_figure(plot_phases(study), out / "scaling_phases.png"),
            save_figure(plot_vs_clients(study), out / "scaling_vs_clients.png"),
        ]


def _series(points: list[Point], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(world sizes, means, stds with NaN as 0) of the points, by world size."""
    points = sorted(points, key=lambda p: p.world_size)
    worlds = np.array([p.world_size for p in points], dtype=float)
    means = np.array([p.mean[name] for p in points], dtype=float)
    stds = np.nan_to_num(np.array([p.std[name] for p in points], dtype=float))
    return worlds, means, stds


def _rank_axis(ax, worlds: list[int]) -> None:
    """MPI ranks on x: a log2 axis when they span more than a factor 8, ticks at the ranks measured."""
    if worlds and max(worlds) / min(worlds) > 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(worlds)))
    ax.set_xticklabels([str(w) for w in sorted(set(worlds))])
    ax.set_xlabel("MPI ranks")


def plot_speedup(study: Study):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.4))
    groups = study.strong_groups()
    worlds = sorted({p.world_size for points in groups.values() for p in points})
    for (clients, points), color in zip(groups.items(), line_colors(len(groups))):
        x, y, err = _series(points, "speedup")
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, color=color, label=f"{clients} clients")
    if worlds:
        smallest = min(worlds)
        ideal = np.array(worlds, dtype=float)
        ax.plot(ideal, ideal / smallest, ls="--", color="black", lw=1,
                label=f"ideal (linear from {smallest} rank(s))")
        _rank_axis(ax, worlds)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no number of clients ran on two world sizes", ha="center", va="center",
                transform=ax.transAxes, color="0.4")
    ax.set_ylabel("speed-up  t(smallest world) / t(world)")
    ax.set_title("Strong scaling: speed-up of the median round time")
    return fig


def plot_efficiency(study: Study):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.4))
    groups = study.strong_groups()
    weak = study.weak_groups()
    colors = line_colors(len(groups) + len(weak))
    for (clients, points), color in zip(groups.items(), colors):
        x, y, err = _series(points, "efficiency")
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, color=color, label=f"strong, {clients} clients")
    for (per_rank, points), color in zip(weak.items(), colors[len(groups):]):
        x, y, err = _series(points, "weak_efficiency")
        ax.errorbar(x, y, yerr=err, marker="s", ms=4, capsize=3, ls="--", color=color,
                    label=f"weak, {float(per_rank):g} clients per rank")
    ax.axhline(1.0, color="black", lw=1, ls=":", label="ideal")
    top = max([1.0] + [p.mean[n] for p in study.points for n in ("efficiency", "weak_efficiency")
                       if np.isfinite(p.mean[n])])
    ax.set_ylim(0, 1.1 * top)
    _rank_axis(ax, [p.world_size for p in study.points])
    ax.set_ylabel("parallel efficiency")
    ax.set_title("Scaling efficiency (strong: speed-up / (world / smallest world); weak: t(smallest) / t(world))")
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def plot_phases(study: Study):
    """Median phase times of every point stacked on one axis, its median round time as a marker."""
    import matplotlib.pyplot as plt

    points = study.points
    fig, ax = plt.subplots(figsize=(min(5 + 0.7 * len(points), 16), 4.4))
    x = np.arange(len(points))
    bottom = np.zeros(len(points))
    for phase, color in zip(SHARE_PHASES, line_colors(len(SHARE_PHASES))):
        values = np.array([p.mean[f"phase:{phase}"] for p in points])
        ax.bar(x, values, bottom=bottom, color=color, width=0.7, label=phase.removeprefix("time_"))
        bottom += values
    rounds = np.array([p.mean["median_round_s"] for p in points])
    ax.plot(x, rounds, ls="none", marker="D", ms=5, color="black", label="round wall time, rank 0 (time_round)")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{p.num_clients} clients\n{p.world_size} ranks" for p in points], fontsize=8)
    ax.set_ylim(0, 1.08 * max(float(np.nanmax(np.maximum(bottom, rounds))), 1e-9))
    ax.set_ylabel("median time per round (s)")
    ax.set_title("Phase times per point (slowest rank per phase; one scale for all points)")
    ax.legend(fontsize=8, title="phase", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _unit(points: list[Point], names: tuple[str, ...]) -> tuple[float, str]:
    """One byte unit for the points' values of these names (their largest finite value)."""
    values = [p.mean[n] for p in points for n in names if np.isfinite(p.mean[n])]
    return byte_unit(max(values, default=0.0))


def plot_vs_clients(study: Study):
    """Round time, peak memory per rank and bytes per round against the number of clients, per world size."""
    import matplotlib.pyplot as plt

    fig, (time_ax, memory_ax, bytes_ax) = plt.subplots(1, 3, figsize=(15, 4.4))
    worlds = sorted({p.world_size for p in study.points})
    memory_scale, memory_unit = _unit(study.points, ("peak_rss_bytes_max",))
    bytes_scale, bytes_unit = _unit(study.points, ("mpi_bytes_per_round", "sim_bytes_up_per_round",
                                                   "sim_bytes_down_per_round"))
    for world, color in zip(worlds, line_colors(len(worlds))):
        points = sorted((p for p in study.points if p.world_size == world), key=lambda p: p.num_clients)
        clients = [p.num_clients for p in points]
        label = f"{world} rank(s)"
        time_ax.errorbar(clients, [p.mean["median_round_s"] for p in points],
                         yerr=np.nan_to_num([p.std["median_round_s"] for p in points]), marker="o", ms=4, capsize=3,
                         color=color, label=label)
        memory_ax.plot(clients, [p.mean["peak_rss_bytes_max"] / memory_scale for p in points], marker="o", ms=4,
                       color=color, label=f"{label}: largest rank")
        memory_ax.plot(clients, [p.mean["peak_rss_bytes_mean"] / memory_scale for p in points], marker="o", ms=3,
                       ls=":", color=color, label=f"{label}: mean over ranks")
        bytes_ax.plot(clients, [p.mean["mpi_bytes_per_round"] / bytes_scale for p in points], marker="o", ms=4,
                      color=color, label=f"{label}: MPI")
        simulated = [(p.mean["sim_bytes_up_per_round"] + p.mean["sim_bytes_down_per_round"]) / bytes_scale
                     for p in points]
        bytes_ax.plot(clients, simulated, marker="s", ms=4, ls="--", color=color, label=f"{label}: simulated up+down")
    time_ax.set_title("Median round time")
    time_ax.set_ylabel("s (time_round)")
    memory_ax.set_title("Peak resident memory per rank")
    memory_ax.set_ylabel(memory_unit)
    bytes_ax.set_title("Bytes per round")
    bytes_ax.set_ylabel(bytes_unit)
    clients = sorted({p.num_clients for p in study.points})
    for ax in (time_ax, memory_ax, bytes_ax):
        if max(clients) / min(clients) > 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(clients)
        ax.set_xticklabels([str(c) for c in clients])
        ax.set_xlabel("clients (federation.num_clients)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
