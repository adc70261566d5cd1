"""Whole runs at many clients: start-up, round phases, per-client cost and memory.

Each case is one `florist-mpi run` of the demo model (configs/demo.yaml) on 2 MPI ranks with
one-step clients (LoRA rank 8, 8 generated examples per client, eval off, client adapters not
logged), one round:

  1k          1,000 clients, all sampled
  10k         10,000 clients, all sampled
  100k/1k     100,000 registered clients, 1,000 sampled

It prints, per case, start-up (wall time less the round; and the run's own `time_startup`),
the round's phases from the log (`time_*` attributes), the per-client cost (time_round / K),
each rank's peak resident memory (start-up and round), and the ratios the targets are about:

  per-client cost, 10k / 1k                   (target ≤ 1.1)
  server share of the 10k round                (gather + aggregate + broadcast + log) / time_round, ≤ 5%
  start-up at 10k                              ≤ 30 s
  start-up and peak memory, 100k/1k vs 1k      ≤ 1.5
  `florist-mpi validate` output at 10k         ≤ 2,000 characters

`--client-batch G` adds `train.client_batch: G` to every case (when the installed florist_mpi has
it). Results go to OUT/results.json. Usage:

    python benchmarks/many_clients.py [--cases 1k,10k,100k/1k] [--repeats 1] [--out runs/bench-many]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from launch import run_command

REPO = Path(__file__).resolve().parents[1]
CASES = {"1k": (1000, 1000), "10k": (10000, 10000), "100k/1k": (100000, 1000)}
SERVER_PHASES = ("time_gather", "time_aggregate", "time_broadcast", "time_log")
PHASES = ("time_train", "time_wait", *SERVER_PHASES, "time_merge", "time_eval", "time_round")


def settings(registered: int, sampled: int, output: Path, client_batch: int | None) -> dict:
    values = {
        "run.rounds": 1,
        "run.output": output,
        "federation.num_clients": registered,
        "federation.clients_per_round": sampled,
        "lora.ranks": "null",
        "lora.rank": 8,
        "data.synthetic.examples_per_client": 8,
        "train.local_steps": 1,
        "eval.every": 0,
        "log.client_adapters": "false",
    }
    if client_batch:
        values["train.client_batch"] = client_batch
    return values


def one_run(name: str, out: Path, ranks: int, client_batch: int | None) -> dict:
    registered, sampled = CASES[name]
    output = out / f"{name.replace('/', '_')}.h5"
    command = run_command(REPO / "configs/demo.yaml", settings(registered, sampled, output, client_batch), ranks)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    with h5py.File(output, "r") as handle:
        group = handle["rounds/00000"]
        figures = {key: float(group.attrs[key]) for key in PHASES}
        figures.update(
            wall_s=wall,
            startup_s=wall - figures["time_round"],
            time_startup=float(handle.attrs["time_startup"]),
            clients=sampled,
            per_client_ms=1000 * figures["time_round"] / sampled,
            round_peak_rss_mb=(group["ranks/peak_rss_bytes"][()] / 2**20).tolist(),
            startup_peak_rss_mb=(handle.attrs["startup_peak_rss_bytes"] / 2**20).tolist(),
        )
    figures["peak_rss_mb"] = max(figures["round_peak_rss_mb"] + figures["startup_peak_rss_mb"])
    figures["server_share"] = sum(figures[k] for k in SERVER_PHASES) / figures["time_round"]
    print(f"  {name:<8} wall {wall:6.1f}s  round {figures['time_round']:6.1f}s  start-up {figures['startup_s']:5.1f}s",
          flush=True)
    return figures


def validate_chars(registered: int) -> int:
    command = [sys.executable, "-m", "florist_mpi.cli", "validate", "configs/demo.yaml", "--set",
               f"federation.num_clients={registered}", "--set", "lora.ranks=null", "--set", "lora.rank=8"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"validate failed:\n{result.stderr[-2000:]}")
    return len(result.stdout) + len(result.stderr)


def median_case(runs: list[dict]) -> dict:
    """Per figure, the median over repeats (lists: element-wise)."""
    out = {}
    for key, value in runs[0].items():
        if isinstance(value, list):
            out[key] = [statistics.median(r[key][i] for r in runs) for i in range(len(value))]
        else:
            out[key] = statistics.median(r[key] for r in runs)
    return out


def print_table(results: dict) -> None:
    names = list(results)
    print("\n| figure | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    rows = [("start-up (wall - round) s", "startup_s", "{:.1f}"), ("time_startup s", "time_startup", "{:.1f}")]
    rows += [(key.removeprefix("time_") + " s", key, "{:.2f}") for key in PHASES]
    rows += [("per client ms", "per_client_ms", "{:.2f}"), ("server share", "server_share", "{:.1%}"),
             ("peak RSS per rank MB", "peak_rss_mb", "{:.0f}")]
    for label, key, fmt in rows:
        print(f"| {label} | " + " | ".join(fmt.format(results[n][key]) for n in names) + " |")


def ratios(results: dict, validate: int | None) -> dict:
    out = {}
    if "1k" in results and "10k" in results:
        out["per_client_10k_over_1k"] = results["10k"]["per_client_ms"] / results["1k"]["per_client_ms"]
    if "10k" in results:
        out["server_share_10k"] = results["10k"]["server_share"]
        out["startup_10k_s"] = results["10k"]["startup_s"]
    if "1k" in results and "100k/1k" in results:
        out["startup_100k_over_1k"] = results["100k/1k"]["startup_s"] / results["1k"]["startup_s"]
        out["peak_rss_100k_over_1k"] = results["100k/1k"]["peak_rss_mb"] / results["1k"]["peak_rss_mb"]
    if validate is not None:
        out["validate_chars_10k"] = validate
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="1k,10k,100k/1k", help="comma-separated, of: " + ", ".join(CASES))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--client-batch", type=int, default=None, help="train.client_batch for every case")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-many")
    args = parser.parse_args()
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}: use {', '.join(CASES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{len(names)} case(s) x {args.repeats} on {args.ranks} ranks, client_batch {args.client_batch or 1}",
          flush=True)
    results = {}
    for name in names:
        results[name] = median_case([one_run(name, args.out, args.ranks, args.client_batch)
                                     for _ in range(args.repeats)])
    validate = validate_chars(10000) if "10k" in names else None
    print_table(results)
    summary = ratios(results, validate)
    print()
    for key, value in summary.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    (args.out / "results.json").write_text(json.dumps({"cases": results, "ratios": summary,
                                                       "client_batch": args.client_batch,
                                                       "ranks": args.ranks}, indent=2, default=float))
    print(f"\nwritten: {args.out / 'results.json'}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
