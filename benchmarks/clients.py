"""What a virtual client costs on top of its local steps: reused vs fresh client engines.

Runs `florist-mpi run` on the demo model (eval off, client adapters not logged) with
`train.client_engines` set to `fresh` (a new PEFT wrapper and DeepSpeed engine per
client, then a full garbage collection: the pre-existing path) and to `reuse`,
alternating, and reads each round's `time_train` from the log:

  1. 32 clients on one rank, 1 local step each vs 11 local steps each. One local step
     costs (T11 - T1) / (10 * 32); a client's fixed cost is T1 / 32 minus one step.
  2. 256 clients x 1 local step on 2 ranks: time_train per client.

The second round is the steady state (reused engines are built in the first); the
first round is printed too. Medians over --repeats. Usage:

    python benchmarks/clients.py [--repeats 3] [--clients 32] [--many 256] [--out runs/bench-clients]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
from pathlib import Path

import h5py
from launch import run_command

REPO = Path(__file__).resolve().parents[1]
MODES = ("fresh", "reuse")


def time_train(out: Path, mode: str, clients: int, steps: int, ranks: int) -> list[float]:
    """time_train of each round of one run (seconds)."""
    output = out / f"{mode}_{clients}c_{steps}s_{ranks}r.h5"
    settings = {
        "run.rounds": 2,
        "run.output": output,
        "federation.num_clients": clients,
        "federation.clients_per_round": clients,
        "lora.ranks": "null",
        "lora.rank": 8,
        "train.local_steps": steps,
        "train.client_engines": mode,
        "eval.every": 0,
        "log.client_adapters": "false",
    }
    command = run_command("configs/demo.yaml", settings, ranks)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    with h5py.File(output, "r") as handle:
        return [float(handle["rounds"][key].attrs["time_train"]) for key in sorted(handle["rounds"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32, help="clients on one rank for the fixed-cost measurement")
    parser.add_argument("--many", type=int, default=256, help="clients x 1 step on 2 ranks (0 skips it)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-clients")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    k = args.clients
    runs = {(mode, steps): [] for mode in MODES for steps in (1, 11)}
    for _ in range(args.repeats):
        for mode in MODES:  # alternating, so that load changes hit both modes alike
            for steps in (1, 11):
                runs[mode, steps].append(time_train(args.out, mode, k, steps, ranks=1))
    print(f"## {k} clients on 1 rank, demo model (medians of {args.repeats}; ms per client)\n")
    print(
        "| engines | round | 1 step: time per client | 11 steps: time per client | one local step | "
        "fixed cost per client | fixed cost / step |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    fixed_by_mode = {}
    for mode in MODES:
        for round_index in (0, 1):
            one = statistics.median(r[round_index] for r in runs[mode, 1]) / k
            eleven = statistics.median(r[round_index] for r in runs[mode, 11]) / k
            step = (eleven - one) / 10
            fixed = one - step
            if round_index == 1:
                fixed_by_mode[mode] = fixed
            print(
                f"| {mode} | {round_index} | {one * 1e3:.1f} | {eleven * 1e3:.1f} | {step * 1e3:.1f} | "
                f"{fixed * 1e3:.1f} | {fixed / step:.2f} |"
            )
    print(f"\nfixed cost, steady state: fresh / reuse = {fixed_by_mode['fresh'] / fixed_by_mode['reuse']:.1f}x")

    if args.many:
        many = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                many[mode].append(time_train(args.out, mode, args.many, 1, ranks=2))
        print(f"\n## {args.many} clients x 1 local step on 2 ranks (medians of {args.repeats})\n")
        print("| engines | round | time_train (s) | ms per client (per rank: x2) |")
        print("| --- | --- | --- | --- |")
        for mode in MODES:
            for round_index in (0, 1):
                seconds = statistics.median(r[round_index] for r in many[mode])
                print(f"| {mode} | {round_index} | {seconds:.2f} | {seconds / args.many * 1e3:.1f} |")
        fresh, reuse = (statistics.median(r[1] for r in many[m]) for m in MODES)
        print(f"\nsteady-state round: fresh / reuse = {fresh / reuse:.1f}x")


if __name__ == "__main__":
    main()
