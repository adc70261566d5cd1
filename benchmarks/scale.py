"""Exchange + aggregation at many clients: root vs sharded, on synthetic client factors.

    python benchmarks/scale.py [--ranks 4] [--clients 8,64,256] [--modules 4] [--dim 4096] [--rank 16]
                               [--modes root,sharded] [--mpiexec PATH]

No training: every rank makes its clients' rank-`rank` factors (float32, clients k with
k mod ranks = rank, as the run loop places them) and then runs one round's server side
with the package's own functions, as `federation.py` calls them:
  root     exchange.gather_updates -> aggregate_adapter on rank 0 -> exchange.broadcast_global
  sharded  sharding.sharded_round (metadata, scatter to owners, owners aggregate, all-gather)
Each (K, mode) runs in fresh processes (one mpiexec each), so ru_maxrss is that round's peak.
Reported per configuration: time of exchange, aggregation (the slowest aggregating rank)
and distribution of the globals; peak resident memory of rank 0 and of the largest rank,
and the same peaks less the memory each rank held before making its factors (imports,
MPI), i.e. what the factors and the round cost.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TAU = 0.9


def rss_mb() -> float:
    """Peak resident set of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_updates(world, clients: int, shapes: dict, rank: int):
    from florist_mpi.exchange import ClientUpdate

    scale = np.logspace(0, -2, rank).astype(np.float32)
    updates = []
    for client_id in range(world.rank, clients, world.size):
        g = np.random.default_rng(client_id)
        factors = {}
        for name, (m, n) in shapes.items():
            B = g.standard_normal((m, rank), dtype=np.float32) * (scale / np.float32(m**0.5))
            A = g.standard_normal((rank, n), dtype=np.float32) / np.float32(n**0.5)
            factors[name] = (B, A)
        updates.append(ClientUpdate(client_id, 100 + (37 * client_id) % 400, rank, 0.0, factors))
    return updates


def root_round(world, updates, shapes) -> dict[str, float]:
    import torch

    from florist_mpi import exchange
    from florist_mpi.aggregation import aggregate_adapter

    times = {}
    start = time.perf_counter()
    received = exchange.gather_updates(world, updates, shapes)
    times["exchange"] = time.perf_counter() - start
    start = time.perf_counter()
    global_factors = None
    if world.is_root:  # as RootAggregation does it
        per_module = {
            name: [(torch.from_numpy(c.factors[name][0]), torch.from_numpy(c.factors[name][1])) for c in received]
            for name in shapes
        }
        results = aggregate_adapter("florist", per_module, [c.num_samples for c in received], tau=TAU)
        global_factors = {
            name: (r.B.float().contiguous().numpy(), r.A.float().contiguous().numpy()) for name, r in results.items()
        }
    times["aggregate"] = time.perf_counter() - start
    world.barrier()
    start = time.perf_counter()
    exchange.broadcast_global(world, global_factors, shapes)
    times["distribute"] = time.perf_counter() - start
    return times


def sharded_round(world, updates, shapes) -> dict[str, float]:
    from florist_mpi import comm, sharding

    state = sharding.sharded_round(world, updates, shapes, [], method="florist", tau=TAU, max_rank=None)
    slowest = float(comm.reduce_max(world, np.array([state.time_aggregate]))[0])
    return {"exchange": state.time_scatter, "aggregate": slowest, "distribute": state.time_allgather}


def worker(args) -> None:
    """One configuration under mpiexec; rank 0 prints one JSON line."""
    import torch

    from florist_mpi import comm
    from florist_mpi.model import cores_for_rank

    world = comm.init_world()
    torch.set_num_threads(cores_for_rank(world.local_size))
    shapes = {f"layers.{i}.proj": (args.dim, args.dim) for i in range(args.modules)}
    before = rss_mb()
    updates = make_updates(world, args.clients, shapes, args.rank)
    world.barrier()
    start = time.perf_counter()
    times = (root_round if args.mode == "root" else sharded_round)(world, updates, shapes)
    world.barrier()
    wall = time.perf_counter() - start
    memory = comm.gather_rows(world, np.array([[rss_mb(), before]]))
    if world.is_root:
        peaks, bases = memory[:, 0], memory[:, 1]
        largest = int(np.argmax(peaks))
        print(
            json.dumps(
                {
                    "clients": args.clients,
                    "mode": args.mode,
                    "ranks": world.size,
                    **times,
                    "wall": wall,
                    "rank0_peak_mb": peaks[0],
                    "rank0_round_mb": peaks[0] - bases[0],
                    "largest_rank": largest,
                    "largest_peak_mb": peaks[largest],
                    "largest_round_mb": float(np.max(peaks - bases)),
                }
            ),
            flush=True,
        )


def launch(args, clients: int, mode: str) -> dict:
    command = [
        args.mpiexec,
        "--allow-run-as-root",
        "--oversubscribe",
        "-n",
        str(args.ranks),
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--clients",
        str(clients),
        "--mode",
        mode,
        "--modules",
        str(args.modules),
        "--dim",
        str(args.dim),
        "--rank",
        str(args.rank),
    ]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"K={clients} {mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--clients", default="8,64,256", help="comma-separated K values (1024 needs ~4 GB)")
    parser.add_argument("--modules", type=int, default=4)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--modes", default="root,sharded")
    parser.add_argument("--mpiexec", default=str(Path(sys.executable).parent / "mpiexec"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.clients = int(args.clients)
        worker(args)
        return
    print(
        f"{args.modules} modules {args.dim}x{args.dim}, rank-{args.rank} clients, florist tau={TAU}, "
        f"{args.ranks} ranks (mpiexec -n {args.ranks}), one round's server side",
        flush=True,
    )
    print()
    print(
        "| K | mode | exchange (s) | aggregate (s) | distribute (s) | rank 0 peak (MB) | rank 0 round (MB) "
        "| largest rank peak (MB) | largest round (MB) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = {}
    for clients in (int(k) for k in args.clients.split(",")):
        for mode in args.modes.split(","):
            row = rows[(clients, mode)] = launch(args, clients, mode)
            print(
                f"| {clients} | {mode} | {row['exchange']:.2f} | {row['aggregate']:.2f} | {row['distribute']:.2f} | "
                f"{row['rank0_peak_mb']:.0f} | {row['rank0_round_mb']:.0f} | {row['largest_peak_mb']:.0f} "
                f"(rank {row['largest_rank']}) | {row['largest_round_mb']:.0f} |",
                flush=True,
            )
        if (clients, "root") in rows and (clients, "sharded") in rows:
            root, sharded = rows[(clients, "root")], rows[(clients, "sharded")]
            ratio = sharded["rank0_peak_mb"] / root["rank0_peak_mb"]
            print(
                f"|  | K={clients}: rank 0 peak sharded/root = {ratio:.2f} (round part "
                f"{sharded['rank0_round_mb'] / max(root['rank0_round_mb'], 1e-9):.2f}) |  |  |  |  |  |  |  |",
                flush=True,
            )


if __name__ == "__main__":
    main()
