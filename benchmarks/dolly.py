"""Real-data benchmark: every aggregation method on the 8-client Dolly split.

Runs `florist-mpi run` once per method with the same seed, tiny model and data
(../shared/data/dolly-8clients), then reads the logs and prints one table:
eval loss after the final round, uplink/downlink parameters per round, and
aggregation time. Usage:

    python benchmarks/dolly.py [--ranks 2] [--rounds 5] [--local-steps 60] [--out runs/bench-dolly] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from launch import run_labelled

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "dolly-8clients"
RUNS = [
    ("florist τ=0.8", "florist", 0.8),
    ("florist τ=0.9", "florist", 0.9),
    ("florist τ=1.0", "florist", 1.0),
    ("fedit", "fedit", 1.0),
    ("flora", "flora", 1.0),
    ("flexlora", "flexlora", 1.0),
    ("ffa", "ffa", 1.0),
]


def settings_for(args, method: str, tau: float, output: Path) -> dict:
    settings = {
        "run.rounds": args.rounds,
        "run.seed": 0,
        "run.output": output,
        "federation.num_clients": 8,
        "federation.method": method,
        "federation.tau": tau,
        "model.tiny.hidden_size": 128,
        "model.tiny.intermediate_size": 256,
        "model.tiny.num_hidden_layers": 2,
        "model.tiny.num_attention_heads": 4,
        "model.tiny.vocab_size": 2048,
        "model.warmup_steps": args.warmup_steps,
        "model.warmup_lr": 0.003,
        "lora.ranks": "[16,8,8,4,4,4,2,2]",
        "lora.alpha": "2r",
        "lora.target_modules": "[q_proj,v_proj]",
        "data.source": "json",
        "data.path": str(DATA),
        "data.max_length": 128,
        "train.local_steps": args.local_steps,
        "train.micro_batch_size": 8,
        "train.lr": 0.001,
        "eval.every": args.rounds,
        "eval.batch_size": 40,
        "log.client_adapters": "false",
    }
    return settings


def run_one(args, label, method, tau, out_dir: Path) -> Path:
    output = out_dir / f"{label.replace(' ', '_').replace('τ=', 'tau')}.h5"
    run_labelled(label, "configs/demo.yaml", settings_for(args, method, tau, output), args.ranks, REPO)
    return output


def summarise(log: Path) -> dict:
    with h5py.File(log, "r") as handle:
        rounds = [handle["rounds"][k] for k in sorted(handle["rounds"].keys())]
        shapes = handle.attrs["module_shapes"]
        num_clients = int(handle.attrs["num_clients"])
        down = [r.attrs["bytes_down"] / 4 / num_clients for r in rounds]
        kept = [len(r["clients/id"]) - len(r["clients/excluded"]) for r in rounds]
        up = [r.attrs["bytes_up"] / 4 / k for r, k in zip(rounds, kept)]
        ranks = [np.mean([r["global"][m].attrs["rank"] for m in r["global"]]) for r in rounds]
        return {
            "initial": float(handle.attrs["initial_eval_loss"]),
            "final": float(rounds[-1].attrs["eval_loss"]),
            "down": float(np.mean(down)),
            "up": float(np.mean(up)),
            "rank": float(np.mean(ranks)),
            "agg_ms": 1000 * float(np.median([r.attrs["time_aggregate"] for r in rounds])),
            "modules": len(shapes),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=60)
    parser.add_argument("--warmup-steps", type=int, default=300)
    parser.add_argument("--out", default="runs/bench-dolly")
    parser.add_argument("--quick", action="store_true", help="1 round, 5 local steps: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.local_steps, args.warmup_steps = 1, 5, 20
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: this benchmark needs the shared Dolly split beside the checkout")
    out_dir = REPO / args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"Dolly, 8 clients, tiny Llama (h=128, 2 layers), ranks [16,8,8,4,4,4,2,2], alpha=2r, q/v, "
        f"{args.rounds} rounds x {args.local_steps} local steps, {args.ranks} MPI ranks",
        flush=True,
    )
    started = time.perf_counter()
    results = {label: summarise(run_one(args, label, method, tau, out_dir)) for label, method, tau in RUNS}
    fedit, flora = results["fedit"], results["flora"]
    print(f"\ninitial eval loss (warmed-up base, before round 1): {results['fedit']['initial']:.4f}\n")
    print(
        "| method | final eval loss | vs FLoRA | mean global rank | downlink params/client/round | "
        "uplink params/client/round | FedIT downlink / this | aggregation ms (median) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, r in results.items():
        print(
            f"| {label} | {r['final']:.4f} | {100 * (r['final'] / flora['final'] - 1):+.2f}% | {r['rank']:.1f} | "
            f"{r['down']:,.0f} | {r['up']:,.0f} | {fedit['down'] / r['down']:.2f}x | {r['agg_ms']:.1f} |"
        )
    f9 = results["florist τ=0.9"]
    print(
        "\nTarget (FLoRIST τ=0.9): eval loss <= FedIT's: "
        f"{'met' if f9['final'] <= fedit['final'] else 'NOT met'}; within 1% of FLoRA's: "
        f"{'met' if abs(f9['final'] / flora['final'] - 1) <= 0.01 else 'NOT met'}; >= 3x less downlink than FedIT: "
        f"{'met' if fedit['down'] / f9['down'] >= 3 else 'NOT met'} ({fedit['down'] / f9['down']:.2f}x)"
    )
    print(f"(benchmark wall time {(time.perf_counter() - started) / 60:.1f} min, {args.ranks} MPI ranks)")


if __name__ == "__main__":
    main()
