"""What a virtual client costs: reused vs fresh client engines, and client batching.

Without --client-batch: runs `florist-mpi run` on the demo model (eval off, client adapters
not logged) with `train.client_engines` set to `fresh` (a new PEFT wrapper and DeepSpeed engine
per client, then a full garbage collection: the pre-existing path) and to `reuse`,
alternating, and reads each round's `time_train` from the log:

  1. 32 clients on one rank, 1 local step each vs 11 local steps each. One local step
     costs (T11 - T1) / (10 * 32); a client's fixed cost is T1 / 32 minus one step.
  2. 256 clients x 1 local step on 2 ranks: time_train per client.

The second round is the steady state (reused engines are built in the first); the
first round is printed too. Medians over --repeats.

With --client-batch 1,4,16,64 (train.client_batch G): --batch-clients demo-sized clients
(rank-8 LoRA) on one rank, at 1 and 16 local steps, each G in its own process, alternating;
per G the median over --repeats of round 1's time_train (after engines are built), clients
per second, the speed-up over G = 1, the process's peak resident memory, and the model FLOPs
utilisation (MFU): the round's model FLOPs (the simulated clock's count, tokens with padding x
4 (N_base + N_adapter) + 2 N_trainable, read from a `system` section whose reference device
does 1 FLOP/s) per second of time_train, over the machine's fp32 GEMM rate measured here with
the same threads. Then the target: --target-clients one-step clients at G = 1 vs G = that many.

    python benchmarks/clients.py [--repeats 3] [--clients 32] [--many 256] [--out runs/bench-clients]
    python benchmarks/clients.py --client-batch 1,4,16,64 [--batch-clients 64] [--threads 1] [--repeats 3]
    python benchmarks/clients.py --client-batch 32 --target-only [--target-clients 32] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path

import h5py
import torch
from launch import run_command

REPO = Path(__file__).resolve().parents[1]
MODES = ("fresh", "reuse")


def two_rounds(output: Path, clients: int, steps: int) -> dict:
    """Settings of a 2-round demo run in which every client trains `steps` steps of a rank-8 LoRA, no eval."""
    return {
        "run.rounds": 2,
        "run.output": output,
        "federation.num_clients": clients,
        "federation.clients_per_round": clients,
        "lora.ranks": "null",
        "lora.rank": 8,
        "train.local_steps": steps,
        "eval.every": 0,
        "log.client_adapters": "false",
    }


def time_train(out: Path, mode: str, clients: int, steps: int, ranks: int) -> list[float]:
    """time_train of each round of one run (seconds)."""
    output = out / f"{mode}_{clients}c_{steps}s_{ranks}r.h5"
    settings = {**two_rounds(output, clients, steps), "train.client_engines": mode}
    command = run_command("configs/demo.yaml", settings, ranks)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    with h5py.File(output, "r") as handle:
        return [float(handle["rounds"][key].attrs["time_train"]) for key in sorted(handle["rounds"])]


# ------------------------------------------------------------------ client batching


def batched_run(out: Path, clients: int, steps: int, client_batch: int, threads: int) -> dict:
    """One 2-round run on one rank: round 1's time_train (s) and model FLOPs, the process's peak RSS (MB)."""
    output = out / f"batch_g{client_batch}_{clients}c_{steps}s.h5"
    settings = {
        **two_rounds(output, clients, steps),
        "train.client_batch": client_batch,
        # a reference device of 1 FLOP/s: the clock's per-client compute seconds are the model FLOPs
        "system.reference_flops": 1.0,
    }
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    process = subprocess.Popen(run_command("configs/demo.yaml", settings, 1), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"G={client_batch} failed:\n{process.stderr.read().decode()[-3000:]}")
    with h5py.File(output, "r") as handle:
        round1 = handle["rounds"][sorted(handle["rounds"])[1]]
        return {"time": float(round1.attrs["time_train"]), "flops": float(round1["clients"]["sim_compute_s"][()].sum()),
                "peak_mb": usage.ru_maxrss / 1024}


def gemm_rate(threads: int) -> float:
    """The best fp32 matrix-product rate (FLOP/s) of this machine with `threads` threads, square sizes 256-2048."""
    torch.set_num_threads(threads)
    best = 0.0
    for size in (256, 512, 1024, 2048):
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b
        repeats = max(3, int(2e9 / size**3))
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best


def client_batching(args) -> None:
    if not args.target_only:
        batching_table(args)
    t = args.target_clients
    target = {g: [] for g in (1, t)}
    for _ in range(args.repeats):
        for g in (1, t):
            target[g].append(batched_run(args.out, t, 1, g, args.threads)["time"])
    one, many = (statistics.median(target[g]) for g in (1, t))
    verdict = "met: >= 3x" if one / many >= 3 else "NOT met: < 3x"
    print(f"\ntarget: {t} one-step clients on 1 rank, {args.threads} thread(s), round 1 time_train: G = 1 {one:.3f} s, "
          f"G = {t} {many:.3f} s (medians of {args.repeats}: {[round(x, 3) for x in target[1]]} vs "
          f"{[round(x, 3) for x in target[t]]}): {one / many:.2f}x ({verdict})")


def batching_table(args) -> None:
    sizes = [int(g) for g in args.client_batch.split(",")]
    if sizes[0] != 1:
        sizes.insert(0, 1)
    k = args.batch_clients
    runs = {(g, steps): [] for g in sizes for steps in (1, 16)}
    for _ in range(args.repeats):
        for steps in (1, 16):
            for g in sizes:  # alternating, so that load changes hit every G alike
                runs[g, steps].append(batched_run(args.out, k, steps, g, args.threads))
    rate = gemm_rate(args.threads)
    print(f"## {k} clients on 1 rank, demo model, rank-8 LoRA, {args.threads} thread(s); medians of {args.repeats}\n")
    print(f"measured fp32 GEMM rate: {rate / 1e9:.1f} GFLOP/s\n")
    print("| local steps | G | time_train round 1 (s) | clients/s | speed-up over G = 1 | peak RSS (MB) | "
          "model GFLOP/s | MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for steps in (1, 16):
        base = statistics.median(r["time"] for r in runs[1, steps])
        for g in sizes:
            seconds = statistics.median(r["time"] for r in runs[g, steps])
            flops = statistics.median(r["flops"] for r in runs[g, steps])
            peak = statistics.median(r["peak_mb"] for r in runs[g, steps])
            print(f"| {steps} | {g} | {seconds:.3f} | {k / seconds:.1f} | {base / seconds:.2f}x | {peak:.0f} | "
                  f"{flops / seconds / 1e9:.2f} | {flops / seconds / rate:.1%} |")
    largest = sizes[-1]
    per_client = (statistics.median(r["peak_mb"] for r in runs[largest, 16])
                  - statistics.median(r["peak_mb"] for r in runs[1, 16])) / (largest - 1)
    print(f"\npeak memory per extra client in a group (16 steps, G = {largest} vs 1): {per_client:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32, help="clients on one rank for the fixed-cost measurement")
    parser.add_argument("--many", type=int, default=256, help="clients x 1 step on 2 ranks (0 skips it)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-clients")
    parser.add_argument("--client-batch", default=None, help="comma-separated G to compare (train.client_batch)")
    parser.add_argument("--batch-clients", type=int, default=64, help="clients of the client-batching runs")
    parser.add_argument("--target-clients", type=int, default=32, help="one-step clients of the 3x target")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the client-batching runs")
    parser.add_argument("--target-only", action="store_true", help="only the one-step target (no G table)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.client_batch:
        client_batching(args)
        return

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
