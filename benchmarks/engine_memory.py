"""Does a rank's memory grow with the number of virtual clients it trains? ZeRO-1 vs ZeRO-0.

Every client of a ZeRO 1-2 (or bf16/fp16) engine gets a fresh PEFT wrapper and DeepSpeed
engine (training.train_client). If an engine is not torn down, each client leaves its LoRA,
optimizer state and hooks behind, and a rank's memory grows with its number of clients.
This script runs real `florist-mpi run`s on one rank, each in a process of its own, and
reads the process's peak resident memory (ru_maxrss):

  tiny model (hidden 256, MLP 512, 2 layers), LoRA rank 16 on every linear layer,
  2 rounds, 8 and 64 clients, for ZeRO-1 and for ZeRO-0 with fresh engines.

ZeRO-1's growth from 8 to 64 clients must stay within 1.25x ZeRO-0-fresh's growth + 30 MB
(issue 25's acceptance check). Usage:

    python benchmarks/engine_memory.py [--clients 8,64] [--out runs/bench-engine-memory]

Prints one line per run and a verdict; exit status 1 when the check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# One process, one run; prints the run's exit code and the process's peak RSS (KiB on Linux).
PEAK_RSS = """
import json, resource, sys
from florist_mpi.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""

VARIANTS = {  # label -> train settings
    "zero1": {"train.zero_stage": 1},
    "zero0-fresh": {"train.zero_stage": 0, "train.client_engines": "fresh"},
}


def settings(clients: int, output: Path) -> dict:
    """The measured model and run: the demo's tiny Llama widened to hidden 256, rank-16 LoRA on every linear layer."""
    return {
        "run.rounds": 2,
        "run.output": output,
        "federation.num_clients": clients,
        "federation.clients_per_round": clients,
        "model.tiny.hidden_size": 256,
        "model.tiny.intermediate_size": 512,
        "lora.ranks": "null",
        "lora.rank": 16,
        "lora.alpha": 32,
        "train.local_steps": 1,
        "data.synthetic.examples_per_client": 16,
        "eval.every": 0,
        "log.client_adapters": "false",
    }


def peak_rss_mb(clients: int, variant: str, out: Path) -> float:
    """Peak resident memory (MB) of one `florist-mpi run` of `clients` clients on one rank."""
    output = out / f"{variant}_{clients}.h5"
    overrides = {**settings(clients, output), **VARIANTS[variant]}
    argv = ["run", "configs/demo.yaml", "--overwrite"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, *argv], cwd=REPO, env=env, capture_output=True,
                            text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines or json.loads(lines[-1])["code"] != 0:
        sys.exit(f"{variant} with {clients} clients failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])["peak_kib"] / 1024


def measure(client_counts: list[int], out: Path) -> dict[str, dict[int, float]]:
    """variant -> clients -> peak RSS (MB)."""
    out.mkdir(parents=True, exist_ok=True)
    peaks: dict[str, dict[int, float]] = {variant: {} for variant in VARIANTS}
    for clients in client_counts:
        for variant in VARIANTS:
            peaks[variant][clients] = peak_rss_mb(clients, variant, out)
            print(f"  {variant:<12} {clients:>4} clients: peak RSS {peaks[variant][clients]:7.1f} MB", flush=True)
    return peaks


def verdict(peaks: dict[str, dict[int, float]], low: int, high: int) -> tuple[bool, str]:
    """ZeRO-1's growth <= 1.25 x ZeRO-0-fresh's growth + 30 MB."""
    grow_zero1 = peaks["zero1"][high] - peaks["zero1"][low]
    grow_zero0 = peaks["zero0-fresh"][high] - peaks["zero0-fresh"][low]
    limit = 1.25 * grow_zero0 + 30.0
    ok = grow_zero1 <= limit
    return ok, (
        f"growth {low} -> {high} clients: ZeRO-1 {grow_zero1:+.1f} MB, ZeRO-0 fresh {grow_zero0:+.1f} MB; "
        f"limit 1.25 x {grow_zero0:.1f} + 30 = {limit:.1f} MB: {'PASS' if ok else 'FAIL'}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="8,64", help="two client counts, low,high")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-engine-memory")
    args = parser.parse_args()
    low, high = (int(part) for part in args.clients.split(","))
    peaks = measure([low, high], args.out)
    ok, line = verdict(peaks, low, high)
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
