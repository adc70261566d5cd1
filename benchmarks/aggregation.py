"""Aggregation benchmark at Llama-7B shapes, three routes side by side in one process.

    python benchmarks/aggregation.py [--modules 64] [--dim 4096] [--repeats 5] [--quick]

(a) this project's FLoRIST (`aggregate_adapter`, float64 Gram route, truncation
    before forming the outputs);
(b) a faithful re-implementation of the official route: three thin SVDs (B_s, A_s,
    the core P), full U_B U_P and V_Pᵀ V_Aᵀ formed, then truncated;
(c) FlexLoRA's dense path (form ΔW, full SVD) on one module, scaled to all modules.
Also measures GEMM throughput and reports (a) against its FLOP floor.
Factors are random with decaying column scales (trained adapters have decaying
spectra), 8 clients with ranks [64,32,16,16,8,8,4,4], tau = 0.9.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from florist_mpi.aggregation import aggregate_adapter, select_rank

RANKS = [64, 32, 16, 16, 8, 8, 4, 4]
SAMPLES = [1579, 685, 3775, 1830, 2152, 1776, 2531, 607]  # the Dolly split's client sizes
TAU = 0.9


def make_adapter(modules: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    adapter = {}
    for i in range(modules):
        factors = []
        for r in RANKS:
            scale = torch.logspace(0, -2, r)
            B = torch.randn(dim, r, generator=g) * scale / dim**0.5
            A = torch.randn(r, dim, generator=g) / dim**0.5
            factors.append((B, A))
        adapter[f"layers.{i}.proj"] = factors
    return adapter


def official_route(factors, weights, tau):
    """As the FLoRIST reference code does it: 3 thin SVDs, full products, then truncation."""
    w = torch.tensor(weights, dtype=torch.float32)
    p = w / w.sum()
    B_s = torch.cat([B for B, _ in factors], dim=1)
    A_s = torch.cat([pk * A for pk, (_, A) in zip(p, factors)], dim=0)
    U_B, S_B, Vh_B = torch.linalg.svd(B_s, full_matrices=False)
    U_A, S_A, Vh_A = torch.linalg.svd(A_s, full_matrices=False)
    P = torch.diag(S_B) @ Vh_B @ U_A @ torch.diag(S_A)
    U_P, S_P, Vh_P = torch.linalg.svd(P, full_matrices=False)
    B_full = U_B @ U_P @ torch.diag(S_P)
    A_full = Vh_P @ Vh_A
    rank = select_rank(S_P, tau)
    return B_full[:, :rank].contiguous(), A_full[:rank].contiguous(), rank


def flexlora_dense(factors, weights):
    w = torch.tensor(weights, dtype=torch.float32)
    p = w / w.sum()
    delta = sum(pk * B @ A for pk, (B, A) in zip(p, factors))
    return torch.linalg.svd(delta, full_matrices=False)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def gemm_rate(dim: int, width: int, dtype) -> float:
    a, b = torch.randn(dim, dim, dtype=dtype), torch.randn(dim, width, dtype=dtype)
    t, _ = timed(lambda: a @ b, 5)
    return 2 * dim * dim * width / t


def fast_route_flops(modules: int, dim: int, rank: float) -> float:
    """Necessary work of (a): two Gram products (float64), the two output products."""
    R = sum(RANKS)
    grams = 2 * (2 * dim * R * R)
    outputs = 2 * (2 * dim * R * rank)
    return modules * (grams + outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", type=int, default=64)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="8 modules, 2 repeats: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.modules, args.repeats = 8, 2
    print(f"{args.modules} modules {args.dim}x{args.dim}, ranks {RANKS}, tau={TAU}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    adapter = make_adapter(args.modules, args.dim)

    t_fast, fast = timed(lambda: aggregate_adapter("florist", adapter, SAMPLES, tau=TAU), args.repeats)
    t_official, official = timed(lambda: {n: official_route(f, SAMPLES, TAU) for n, f in adapter.items()}, args.repeats)
    one = next(iter(adapter.values()))
    t_dense_one, _ = timed(lambda: flexlora_dense(one, SAMPLES), max(1, min(args.repeats, 2)))
    t_dense = t_dense_one * args.modules

    # Agreement of (a) and (b) on every module, by a random probe (ΔW is never formed).
    probe = torch.randn(args.dim, 1, dtype=torch.float64)
    worst = 0.0
    for name, result in fast.items():
        B_b, A_b, rank_b = official[name]
        assert rank_b == result.rank, (name, rank_b, result.rank)
        y_a = result.B.double() @ (result.A.double() @ probe)
        y_b = B_b.double() @ (A_b.double() @ probe)
        worst = max(worst, float((y_a - y_b).norm() / y_b.norm()))
    mean_rank = sum(r.rank for r in fast.values()) / len(fast)

    rate64 = gemm_rate(args.dim, sum(RANKS), torch.float64)
    rate32 = gemm_rate(args.dim, sum(RANKS), torch.float32)
    floor = fast_route_flops(args.modules, args.dim, mean_rank) / rate64
    print(f"mean global rank {mean_rank:.1f}; max relative difference (a) vs (b) on a probe: {worst:.1e}")
    print(f"GEMM throughput ({args.dim}x{args.dim} @ {args.dim}x{sum(RANKS)}): float64 {rate64 / 1e9:.1f} GFLOP/s, "
          f"float32 {rate32 / 1e9:.1f} GFLOP/s")
    print()
    print("| route | median time (s) | ratio |")
    print("| --- | --- | --- |")
    print(f"| (a) florist_mpi, Gram route, {args.modules} modules | {t_fast:.3f} | 1.00 |")
    print(f"| (b) official 3-SVD route | {t_official:.3f} | {t_official / t_fast:.2f}x slower than (a) |")
    print(f"| (c) FlexLoRA dense SVD (1 module x {args.modules}) | {t_dense:.1f} | {t_dense / t_fast:.0f}x slower than (a) |")
    print(f"| FLOP floor of (a) at float64 GEMM speed | {floor:.3f} | (a) is {t_fast / floor:.2f}x the floor |")
    print()
    print(f"targets: (a) >= 3x faster than (b): {'met' if t_official / t_fast >= 3 else 'NOT met'}; "
          f">= 500x faster than (c): {'met' if t_dense / t_fast >= 500 else 'NOT met'}; "
          f"within 2x of the floor: {'met' if t_fast / floor <= 2 else 'NOT met'}")


if __name__ == "__main__":
    main()
