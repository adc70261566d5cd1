"""`florist-mpi report --scaling LOG...`: the logs of a scaling study as speed-up and efficiency.

A study is a set of runs of one config that differ only in the MPI world size, the number of
clients (`federation.num_clients`), the log path (`run.output`) and the repeat (a run of the same
pair again; jobs/scaling_study.sbatch writes `clients<C>_ranks<N>_rep<R>.h5`). Anything else is
refused, naming the first config key that differs.

Every time is rank 0's wall time of a round (`time_round`), summarised per run as the median over
the rounds used (all, or all but the first with --skip-first-round: the first round also builds
engines and fills caches). Then, with t(N) the mean over repeats of the runs' medians at world N:

- strong scaling, runs with the same number of clients: speed-up = t(smallest world) / t(this run),
  efficiency = speed-up / (world / smallest world);
- weak scaling, runs with the same clients per rank (clients per round / world): efficiency =
  t(smallest world) / t(this run).

Per run also: the load imbalance (max / mean over ranks of `ranks/time_train`, median over rounds),
each rank's peak resident memory, the phase times and their shares of the round, the MPI bytes of
the simulation and the simulated federated bytes per round, and the start-up. A point (clients,
world) averages its repeats: mean ± sample standard deviation.

The forms printed (text, --csv, --json) live in scaling_forms, the figures in scaling_plots.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from florist_mpi.analysis import PHASES, Run
from florist_mpi.errors import UserError

# The config keys a study's runs may differ in (besides the world size and the repeat, which are not config).
STUDY_KEYS = ("run.output", "federation.num_clients")
# The repeat index in a log's name, as jobs/scaling_study.sbatch writes it: clients8_ranks2_rep1.h5.
REPEAT_IN_NAME = re.compile(r"_rep(\d+)$")
# Phases a round is split into for the shares: each its slowest rank's (docs/log-format.md).
SHARE_PHASES = PHASES
NOT_A_STUDY = ("a scaling study's logs may differ only in MPI ranks, federation.num_clients, run.output and the "
               "repeat: report them without --scaling")


@dataclass
class RunFigures:
    """One log of the study, summarised over the rounds used. Times in s, memory and traffic in bytes."""

    label: str
    path: str
    world_size: int
    num_clients: int
    clients_per_round: int
    repeat: int
    num_nodes: int
    rounds_used: list[int]
    median_round_s: float
    mean_round_s: float
    phase_s: dict[str, float]  # median per round of each phase (its slowest rank's) and of time_wait
    phase_share: dict[str, float]  # each phase's total / the rounds' total time_round; "other" the rest
    load_imbalance: float  # median over rounds of max / mean over ranks of ranks/time_train (NaN: not recorded)
    peak_rss_bytes_max: float  # the largest peak of any rank in the rounds used
    peak_rss_bytes_mean: float  # the mean over ranks of each rank's peak
    peak_gpu_bytes_max: float  # NaN on CPU
    mpi_bytes_per_round: float  # sent by all ranks (= received by all), mean over rounds
    sim_bytes_up_per_round: float
    sim_bytes_down_per_round: float
    time_startup_s: float
    speedup: float = math.nan
    efficiency: float = math.nan
    weak_efficiency: float = math.nan
    strong_reference_world: int | None = None  # None: no other world size with these clients
    weak_reference_world: int | None = None  # None: no other world size with these clients per rank

    @property
    def clients_per_rank(self) -> Fraction:
        return Fraction(self.clients_per_round, self.world_size)


@dataclass
class Point:
    """The runs of one (clients, world size) pair: their repeats' mean and sample standard deviation."""

    num_clients: int
    world_size: int
    runs: list[RunFigures]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)


# The per-run numbers a point averages (RunFigures attributes).
AVERAGED = ("median_round_s", "speedup", "efficiency", "weak_efficiency", "load_imbalance", "peak_rss_bytes_max",
            "peak_rss_bytes_mean", "peak_gpu_bytes_max", "mpi_bytes_per_round", "sim_bytes_up_per_round",
            "sim_bytes_down_per_round", "time_startup_s")


@dataclass
class Study:
    runs: list[RunFigures]  # in the order (clients, world, repeat)
    points: list[Point]
    skip_first_round: bool
    config: dict  # the first log's config, as a dict
    peak_rss_scope: str

    def strong_groups(self) -> dict[int, list[Point]]:
        """num_clients -> its points by world size (strong scaling), only where there are two world sizes or more."""
        groups: dict[int, list[Point]] = {}
        for point in self.points:
            groups.setdefault(point.num_clients, []).append(point)
        return {k: v for k, v in sorted(groups.items()) if len({p.world_size for p in v}) > 1}

    def weak_groups(self) -> dict[Fraction, list[Point]]:
        """clients per rank -> its points by world size, only where there are two world sizes or more."""
        groups: dict[Fraction, list[Point]] = {}
        for point in self.points:
            groups.setdefault(point.runs[0].clients_per_rank, []).append(point)
        return {k: v for k, v in sorted(groups.items()) if len({p.world_size for p in v}) > 1}


# ------------------------------------------------------------------ what may be grouped


def flat_config(run: Run) -> dict[str, object]:
    """The logged config as dotted key -> value (lists and scalars as they are)."""
    flat: dict[str, object] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = value

    walk("", run.config.model_dump(mode="json"))
    return flat


def check_study(runs: list[Run], skip_first_round: bool) -> None:
    """Raise UserError (one line) unless the logs form one study with rounds to measure."""
    first = flat_config(runs[0])
    for run in runs:
        rounds = run.rounds
        if rounds.empty:
            raise UserError(f"log '{run.path}' holds no completed round: a scaling study needs one round or more "
                            "per log (wait for round 0, or leave the log out)")
        if skip_first_round and len(rounds) < 2:
            raise UserError(f"log '{run.path}' holds 1 round and --skip-first-round leaves none: run 2 rounds or "
                            "more (--set run.rounds=N), or drop --skip-first-round")
        sizes = sorted(set(rounds["world_size"].tolist()))
        if len(sizes) > 1:
            raise UserError(f"log '{run.path}' ran its rounds on {' and '.join(map(str, sizes))} MPI ranks (resumed "
                            "on another number): a scaling study needs one world size per log; leave it out")
        missing = rounds.index[~np.isfinite(rounds["time_round"])].tolist()
        if missing:
            raise UserError(f"log '{run.path}' has no time_round in round {missing[0]} (written before rounds "
                            "recorded their wall time): rerun the study with this florist_mpi")
        if run is runs[0]:
            continue
        other = flat_config(run)
        for key in list(first) + [k for k in other if k not in first]:
            if key in STUDY_KEYS or first.get(key) == other.get(key):
                continue
            raise UserError(f"log '{run.path}' differs from '{runs[0].path}' in config key {key} "
                            f"({_short(other.get(key))} vs {_short(first.get(key))}): {NOT_A_STUDY}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------------ the figures of one log


def run_figures(run: Run, label: str, repeat: int, skip_first_round: bool) -> RunFigures:
    """One log summarised over its rounds used (all, or all but the first)."""
    frame = run.rounds
    if skip_first_round:
        frame = frame.iloc[1:]
    used = frame.index.tolist()
    per_rank = run.per_rank
    per_rank = per_rank[per_rank.index.get_level_values("round").isin(used)] if not per_rank.empty else per_rank
    total_round = float(frame["time_round"].sum())
    shares = {phase: float(frame[phase].fillna(0.0).sum()) / total_round if total_round > 0 else math.nan
              for phase in (*SHARE_PHASES, "time_wait")}
    shares["other"] = 1.0 - sum(shares[p] for p in SHARE_PHASES)  # sampling, barriers, collecting the figures
    launch = run.launch
    return RunFigures(
        label=label,
        path=str(run.path),
        world_size=int(frame["world_size"].iloc[0]),
        num_clients=run.num_clients,
        clients_per_round=run.config.federation.participants_per_round(),
        repeat=repeat,
        num_nodes=int(launch.get("num_nodes", 0)) or len(set(launch.get("hosts", []))) or 1,
        rounds_used=[int(r) for r in used],
        median_round_s=float(frame["time_round"].median()),
        mean_round_s=float(frame["time_round"].mean()),
        phase_s={phase: float(frame[phase].fillna(0.0).median()) for phase in (*SHARE_PHASES, "time_wait")},
        phase_share=shares,
        load_imbalance=_load_imbalance(per_rank),
        peak_rss_bytes_max=_column_max(per_rank, "peak_rss_bytes"),
        peak_rss_bytes_mean=_per_rank_peak_mean(per_rank, "peak_rss_bytes"),
        peak_gpu_bytes_max=_column_max(per_rank, "peak_gpu_bytes"),
        mpi_bytes_per_round=_per_round_sum(per_rank, "mpi_bytes_sent"),
        sim_bytes_up_per_round=float(frame["bytes_up"].mean()),
        sim_bytes_down_per_round=float(frame["bytes_down"].mean()),
        time_startup_s=float(launch.get("time_startup", math.nan)),
    )


def _load_imbalance(per_rank) -> float:
    """Median over rounds of max / mean over ranks of the ranks' training time (1: perfectly even)."""
    if per_rank.empty or "time_train" not in per_rank:
        return math.nan
    train = per_rank["time_train"].groupby(level="round")
    ratios = (train.max() / train.mean()).replace([np.inf, -np.inf], np.nan).dropna()
    return float(ratios.median()) if not ratios.empty else math.nan


def _column_max(per_rank, column: str) -> float:
    return float(per_rank[column].max()) if column in per_rank and not per_rank.empty else math.nan


def _per_rank_peak_mean(per_rank, column: str) -> float:
    """Each rank's peak over the rounds used, averaged over ranks."""
    if column not in per_rank or per_rank.empty:
        return math.nan
    return float(per_rank[column].groupby(level="rank").max().mean())


def _per_round_sum(per_rank, column: str) -> float:
    """Summed over ranks, averaged over the rounds used."""
    if column not in per_rank or per_rank.empty:
        return math.nan
    return float(per_rank[column].groupby(level="round").sum().mean())


# ------------------------------------------------------------------ the study


def repeat_index(path) -> int | None:
    """The repeat written in the log's name (`..._rep2.h5` -> 2), None when the name has none."""
    match = REPEAT_IN_NAME.search(Path(path).stem)
    return int(match.group(1)) if match else None


def scaling_study(runs: list[Run], labels: list[str], skip_first_round: bool = False) -> Study:
    """The study's figures: every run's, then speed-up and efficiencies, then the points' means."""
    check_study(runs, skip_first_round)
    figures = []
    seen: dict[tuple[int, int], int] = {}
    for run, label in zip(runs, labels):
        world = int(run.rounds["world_size"].iloc[0])
        pair = (run.num_clients, world)
        ordinal = seen.get(pair, 0)
        seen[pair] = ordinal + 1
        named = repeat_index(run.path)
        figures.append(run_figures(run, label, ordinal if named is None else named, skip_first_round))
    figures.sort(key=lambda f: (f.num_clients, f.world_size, f.repeat, f.label))
    _strong(figures)
    _weak(figures)
    points = _points(figures)
    return Study(runs=figures, points=points, skip_first_round=skip_first_round,
                 config=runs[0].config.model_dump(mode="json"),
                 peak_rss_scope=str(runs[0].launch.get("peak_rss_scope", "")))


def _reference(group: list[RunFigures]) -> tuple[int, float]:
    """The group's smallest world size and the mean over its repeats of their median round times."""
    smallest = min(f.world_size for f in group)
    return smallest, float(np.mean([f.median_round_s for f in group if f.world_size == smallest]))


def _strong(figures: list[RunFigures]) -> None:
    """Speed-up and efficiency among the runs with the same number of clients (NaN: no other world size)."""
    for clients in sorted({f.num_clients for f in figures}):
        group = [f for f in figures if f.num_clients == clients]
        if len({f.world_size for f in group}) < 2:
            continue
        world, seconds = _reference(group)
        for f in group:
            f.strong_reference_world = world
            f.speedup = seconds / f.median_round_s if f.median_round_s > 0 else math.nan
            f.efficiency = f.speedup / (f.world_size / world)


def _weak(figures: list[RunFigures]) -> None:
    """Weak-scaling efficiency among the runs with the same clients per rank (NaN: no other world size)."""
    for per_rank in sorted({f.clients_per_rank for f in figures}):
        group = [f for f in figures if f.clients_per_rank == per_rank]
        if len({f.world_size for f in group}) < 2:
            continue
        world, seconds = _reference(group)
        for f in group:
            f.weak_reference_world = world
            f.weak_efficiency = seconds / f.median_round_s if f.median_round_s > 0 else math.nan


def _points(figures: list[RunFigures]) -> list[Point]:
    points: dict[tuple[int, int], Point] = {}
    for f in figures:
        points.setdefault((f.num_clients, f.world_size), Point(f.num_clients, f.world_size, [])).runs.append(f)
    for point in points.values():
        for name in AVERAGED:
            values = np.array([getattr(f, name) for f in point.runs], dtype=np.float64)
            finite = values[np.isfinite(values)]
            point.mean[name] = float(finite.mean()) if finite.size else math.nan
            point.std[name] = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
        for phase in point.runs[0].phase_s:
            point.mean[f"phase:{phase}"] = float(np.mean([f.phase_s[phase] for f in point.runs]))
        for phase in point.runs[0].phase_share:
            point.mean[f"share:{phase}"] = float(np.mean([f.phase_share[phase] for f in point.runs]))
    return list(points.values())
