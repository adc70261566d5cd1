"""What rank 0 prints while a run goes: the start banner and one line per round.

Lines go through tqdm.write so that they never break a progress bar, and are flushed at
once so that a Slurm output file shows them as they happen.
"""
from __future__ import annotations

import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from florist_mpi import evaluation

PHASES = ("time_train", "time_gather", "time_aggregate", "time_broadcast", "time_merge", "time_eval")


def say(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def banner(cfg, world_size: int, device: str, num_modules: int, first_round: int, initial_eval: float) -> str:
    """The run's first line: what runs where, and where it is logged."""
    what = f"resuming after round {first_round - 1}" if first_round else "starting"
    initial = f", initial eval loss {initial_eval:.4f}" if math.isfinite(initial_eval) else ""
    return (
        f"florist-mpi {what}: {cfg.federation.method} (tau={cfg.federation.tau}) | "
        f"{cfg.federation.num_clients} clients "
        f"on {world_size} rank(s), device {device} | {num_modules} adapted modules | "
        f"{cfg.run.rounds} rounds -> {Path(cfg.run.output)}{initial}"
    )


def round_line(round_index: int, rounds: int, attrs: dict, outcome, participants: list[int]) -> str:
    """One completed round: clients, losses, global rank, bytes, simulated time and phase timings."""
    ranks = [r.rank for r in outcome.results.values()] or [0]
    kept = outcome.kept
    losses = [c.train_loss for c in kept] or [math.nan]
    eval_part = "eval -"
    if math.isfinite(attrs["eval_loss"]):
        eval_part = f"eval loss {attrs['eval_loss']:.4f} (ppl {evaluation.perplexity(attrs['eval_loss']):.1f})"
    if math.isfinite(attrs.get("eval_accuracy", math.nan)):
        eval_part = f"eval acc {attrs['eval_accuracy']:.3f}"
    phases = " ".join(f"{k.removeprefix('time_')} {attrs[k]:.2f}s" for k in PHASES)
    excluded = f" ({len(outcome.excluded)} excluded)" if outcome.excluded else ""
    simulated = (
        f" | sim {attrs['sim_time_s']:.1f}s (clock {attrs['sim_clock_s']:.1f}s)" if "sim_time_s" in attrs else ""
    )
    return (
        f"round {round_index} ({round_index + 1}/{rounds}) | "
        f"clients {len(kept)}/{len(participants)}{excluded} | "
        f"train loss {np.mean(losses):.4f} | {eval_part} | global rank mean {np.mean(ranks):.1f} "
        f"| down {attrs['bytes_down'] / 1e6:.2f} MB{simulated} | {phases}"
    )


def empty_round_line(round_index: int, excluded: list[tuple[int, str]]) -> str:
    """Said after a round that aggregated nobody (federation.empty_round: skip)."""
    reasons = sorted({why.split(":")[0] for _, why in excluded})
    return (f"round {round_index}: no client could be aggregated ({len(excluded)} excluded: {', '.join(reasons)}); "
            "the global model is unchanged and the run goes on (federation.empty_round: skip)")


def rank_histogram(ranks) -> str:
    """LoRA ranks as counts, highest rank first: "16 ×1, 8 ×2, 4 ×3" (short for any number of clients)."""
    counts = Counter(int(r) for r in ranks)
    return ", ".join(f"{rank} ×{count}" for rank, count in sorted(counts.items(), reverse=True))


class RoundProgress:
    """Rank 0's progress inside a long round: clients trained so far and an estimated time to go.

    Rank 0 sees only its own clients; as every rank trains the same share, the federation's total
    is estimated from rank 0's fraction. A line is printed at most every `every` seconds, and the
    first only after `every` seconds, so short rounds stay quiet. Lines are plain text (no carriage
    returns), readable in a Slurm output file.
    """

    def __init__(self, round_index: int, total: int, hosted: int, every: float = 10.0, clock=time.monotonic,
                 write=say):
        self.round_index, self.total, self.hosted, self.every = round_index, total, hosted, every
        self.clock, self.write = clock, write
        self.started = self.last = clock()

    def update(self, done: int) -> None:
        """`done` of rank 0's `hosted` clients are trained."""
        now = self.clock()
        if now - self.last < self.every or not 0 < done < self.hosted:
            return
        self.last = now
        fraction = done / self.hosted
        elapsed = now - self.started
        remaining = elapsed * (1.0 - fraction) / fraction
        self.write(
            f"round {self.round_index}: {round(fraction * self.total)}/{self.total} clients trained "
            f"(rank 0: {done}/{self.hosted}), {_duration(elapsed)} elapsed, about {_duration(remaining)} to go"
        )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
