"""Simulated time to a target loss: FLoRIST (τ = 0.8) against FedIT and FLoRA on simulated devices.

Runs `florist-mpi run configs/system/mobile_edge.yaml` once per method (same seed, data and
client profiles), then prints, per method, the mean simulated download / compute / upload
per client and round and the simulated time to reach the lowest eval loss every run reaches,
read from the logs (`report`'s time-to-target rule). The tiny demo adapter is small, so
the shipped links move it in milliseconds; a second table replays the same logged rounds
with every link 100x slower (a stand-in for an adapter 100x larger, e.g. a 1-7B model's),
recomputing each figure from the logged bytes, compute times and profile. Usage:

    python benchmarks/clock.py [--ranks 1] [--rounds 6] [--out runs/bench-clock]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch import run_labelled  # noqa: E402

from florist_mpi import simclock  # noqa: E402
from florist_mpi.analysis import open_run  # noqa: E402
from florist_mpi.config import load_config  # noqa: E402

CONFIG = REPO / "configs" / "system" / "mobile_edge.yaml"
RUNS = [("florist τ=0.8", "florist", 0.8), ("fedit", "fedit", 1.0), ("flora", "flora", 1.0)]
SLOWER = 100.0


def run_one(args, label: str, method: str, tau: float) -> Path:
    output = Path(args.out) / f"{label.replace(' ', '_').replace('τ=', 'tau')}.h5"
    sets = {"run.rounds": args.rounds, "run.output": output, "federation.method": method, "federation.tau": tau,
            "log.client_adapters": "false"}
    run_labelled(label, CONFIG, sets, args.ranks, REPO)
    return output


def replay(log: Path, slower: float) -> dict:
    """The run's simulated figures with every link `slower` times slower, recomputed from the log:
    sim_clock_s after each round, and mean download / compute / upload per aggregated client and round."""
    cfg = load_config(CONFIG)
    profile = simclock.resolve_profile(cfg.system, cfg.federation.num_clients, cfg.run.seed)
    clock, clocks, downs, computes, ups = 0.0, [], [], [], []
    with h5py.File(log, "r") as handle:
        for key in sorted(handle["rounds"]):
            group = handle["rounds"][key]
            clients = group["clients"]
            excluded = set(clients["excluded"][()].tolist())
            slowest = 0.0
            for j, k in enumerate(clients["id"][()].tolist()):
                if k in excluded:
                    continue
                down = simclock.transfer_seconds(
                    int(clients["bytes_down"][j]), profile.downlink_mbps[k] / slower, profile.latency_s[k]
                )
                up = simclock.transfer_seconds(
                    int(clients["bytes_up"][j]), profile.uplink_mbps[k] / slower, profile.latency_s[k]
                )
                compute = float(clients["sim_compute_s"][j])
                slowest = max(slowest, down + compute + up)
                if key != "00000":  # round 0 downloads nothing
                    downs.append(down)
                computes.append(compute)
                ups.append(up)
            clock += float(group.attrs["sim_server_s"]) + slowest
            clocks.append(clock)
    return {"clock": clocks, "down": np.mean(downs), "compute": np.mean(computes), "up": np.mean(ups)}


def table(logs: dict[str, Path], figures: dict[str, dict], title: str) -> None:
    runs = {label: open_run(log) for label, log in logs.items()}
    target = max(float(run.rounds["eval_loss"].min()) for run in runs.values())
    print(f"\n{title}; target eval loss {target:.4f} (the lowest every run reaches)")
    print(
        "| method | download s | compute s | upload s | round s (median) | rounds to target | "
        "simulated time to target s | final eval loss |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, run in runs.items():
        f = figures[label]
        hit = next(i for i, loss in enumerate(run.rounds["eval_loss"].tolist()) if loss <= target)
        per_round = np.diff([0.0] + f["clock"])
        print(
            f"| {label} | {f['down']:.4g} | {f['compute']:.4g} | {f['up']:.4g} | {np.median(per_round):.4g} | "
            f"{hit + 1} | {f['clock'][hit]:.4g} | {run.rounds['eval_loss'].iloc[-1]:.4f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default="runs/bench-clock")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(f"{len(RUNS)} runs of {CONFIG.relative_to(REPO)} ({args.rounds} rounds, {args.ranks} rank(s)):")
    logs = {label: run_one(args, label, method, tau) for label, method, tau in RUNS}
    logged = {label: open_run(log).rounds["sim_clock_s"].tolist() for label, log in logs.items()}
    shipped = {label: replay(log, 1.0) for label, log in logs.items()}
    worst = max(abs(a - b) / b for label in logs for a, b in zip(logged[label], shipped[label]["clock"]))
    print(f"recomputed clock vs logged sim_clock_s: largest relative difference {worst:.1e}")
    table(logs, shipped, "shipped profile (configs/system/mobile_edge.yaml)")
    table(
        logs,
        {label: replay(log, SLOWER) for label, log in logs.items()},
        f"links {SLOWER:g}x slower (recomputed from the logged bytes and compute times)",
    )
    print(
        "\ndownload s: mean per aggregated client and round from round 1 on (round 0 downloads nothing); "
        "compute/upload s: mean per aggregated client and round; round s: median simulated round time."
    )


if __name__ == "__main__":
    main()
