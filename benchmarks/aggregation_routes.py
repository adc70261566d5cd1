"""FLoRIST aggregation of one module as the number of clients grows: Gram vs dense route.

    python benchmarks/aggregation_routes.py [--dim 4096] [--rank 16] [--stacks 512,1024,...]
                                            [--gram-max 4096] [--side-by-side 320] [--tau 0.9]

For one dim×dim module and rank-`rank` clients (R = K · rank), times in one process:
  gram   aggregate(route="gram")  (today's route: two R×R Grams, Cholesky, R×R eigensolver;
                                   past R = dim the stack is rank-deficient and an m×R SVD takes over)
  dense  aggregate(route="dense") (ΔW once, eigensolver of its dim×dim Gram, truncate)
and which of the two `aggregate()` picks there (`exact_route` from m, n, R), and checks that the routes
choose the same rank and agree on ΔW_global (probe vector).
Then, side by side at K = --side-by-side clients: `aggregate` against the plain dense
baseline (form ΔW = Σ p_k B_k A_k in float64, one full SVD, truncate to the same rule).
Gram timings beyond --gram-max are skipped (that route takes minutes there).

    python benchmarks/aggregation_routes.py --lapack-weights

measures the cost model's LAPACK weights instead (florist_mpi.costmodel): torch.linalg.eigh of
s×s (EIGH_FLOPS_PER_CUBE, in s³ GEMM flops) and torch.linalg.svd of rows×cols (THIN_SVD_WEIGHT, in
units of 6·rows·cols² + 20·cols³), each against float64 GEMM timed right beside it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from florist_mpi.aggregation import aggregate, exact_route, select_rank


def make_clients(count: int, dim: int, rank: int, seed: int = 0):
    """Rank-`rank` clients with decaying column scales (trained adapters have decaying spectra)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, rank)
    return [
        (torch.randn(dim, rank, generator=g) * scale / dim**0.5, torch.randn(rank, dim, generator=g) / dim**0.5)
        for _ in range(count)
    ]


def samples(count: int) -> list[int]:
    return [100 + (37 * k) % 400 for k in range(count)]


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def dense_svd_baseline(factors, weights, tau):
    """Form ΔW in float64, one full SVD, truncate by the energy rule: (B, A, rank)."""
    total = float(sum(weights))
    delta = sum((w / total) * (B.double() @ A.double()) for w, (B, A) in zip(weights, factors))
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    rank = select_rank(S, tau)
    return U[:, :rank] * S[:rank], Vh[:rank], rank


def probe_difference(a, b, dim: int) -> float:
    probe = torch.randn(dim, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ya = a[0].double() @ (a[1].double() @ probe)
    yb = b[0].double() @ (b[1].double() @ probe)
    return float((ya - yb).norm() / yb.norm())


def lapack_weights(repeats: int) -> None:
    """Time eigh and thin SVDs against float64 GEMM measured beside each (best of `repeats`)."""
    square = torch.randn(2048, 2048, dtype=torch.float64)

    def gemm_rate() -> float:
        seconds, _ = timed(lambda: square @ square, repeats)
        return 2 * 2048**3 / seconds

    print("| call | time (s) | GEMM GFLOP/s beside it | weight |")
    print("| --- | --- | --- | --- |")
    for s in (512, 1024, 2048):
        X = torch.randn(s, s, dtype=torch.float64)
        G = X @ X.T
        seconds, _ = timed(lambda: torch.linalg.eigh(G), repeats)
        rate = gemm_rate()
        print(f"| eigh {s}x{s} | {seconds:.3f} | {rate / 1e9:.1f} | {seconds * rate / s**3:.1f} s^3 |", flush=True)
    for rows, cols in ((4096, 512), (4096, 1024), (1024, 1024), (2048, 2048)):
        X = torch.randn(rows, cols, dtype=torch.float64) * torch.logspace(0, -3, cols, dtype=torch.float64)
        seconds, _ = timed(lambda: torch.linalg.svd(X, full_matrices=False), repeats)
        rate = gemm_rate()
        count = 6 * rows * cols**2 + 20 * cols**3
        print(f"| svd {rows}x{cols} | {seconds:.3f} | {rate / 1e9:.1f} | {seconds * rate / count:.1f}x the count |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--stacks", default="512,1024,2048,3072,3584,4096,5120,6144", help="values of R = K * rank")
    parser.add_argument("--gram-max", type=int, default=4096, help="largest R at which the Gram route is timed")
    parser.add_argument("--side-by-side", type=int, default=320, help="clients K for aggregate vs ΔW + SVD")
    parser.add_argument("--tau", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--lapack-weights", action="store_true", help="measure the cost model's LAPACK weights")
    args = parser.parse_args()
    if args.lapack_weights:
        lapack_weights(max(args.repeats, 3))
        return
    started = time.perf_counter()
    stacks = [int(x) for x in args.stacks.split(",") if x]
    largest = max(stacks + [args.side_by_side * args.rank]) // args.rank
    clients = make_clients(largest, args.dim, args.rank)
    print(
        f"one {args.dim}x{args.dim} module, rank-{args.rank} clients, tau={args.tau}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    print()
    print("| R = K x r | K | gram (s) | dense (s) | aggregate() picks | rank | gram vs dense |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for R in stacks:
        K = R // args.rank
        factors, weights = clients[:K], samples(K)
        t_dense, dense = timed(
            lambda: aggregate("florist", factors, weights, tau=args.tau, route="dense"), args.repeats
        )
        gram_cell, agree = "skipped", "-"
        if R <= args.gram_max:
            t_gram, gram = timed(
                lambda: aggregate("florist", factors, weights, tau=args.tau, route="gram"), args.repeats
            )
            gram_cell = f"{t_gram:.2f}"
            diff = probe_difference((gram.B, gram.A), (dense.B, dense.A), args.dim)
            agree = f"same rank, {diff:.0e}" if gram.rank == dense.rank else f"RANKS DIFFER {gram.rank}/{dense.rank}"
        print(
            f"| {R} | {K} | {gram_cell} | {t_dense:.2f} | {exact_route(args.dim, args.dim, R)} | "
            f"{dense.rank} | {agree} |",
            flush=True,
        )

    K = args.side_by_side
    factors, weights = clients[:K], samples(K)
    t_base, (B0, A0, rank0) = timed(lambda: dense_svd_baseline(factors, weights, args.tau), 1)
    t_ours, ours = timed(lambda: aggregate("florist", factors, weights, tau=args.tau), 1)
    diff = probe_difference((ours.B, ours.A), (B0, A0), args.dim)
    print()
    print(f"side by side, K = {K} clients (R = {K * args.rank}):")
    print(f"  aggregate() ({exact_route(args.dim, args.dim, K * args.rank)} route): {t_ours:.2f} s, rank {ours.rank}")
    print(f"  form dW + one SVD, truncate: {t_base:.2f} s, rank {rank0}")
    verdict = "met" if t_ours <= t_base and ours.rank == rank0 else "NOT met"
    print(f"  ratio {t_base / t_ours:.2f}x, probe difference {diff:.0e}; target (no slower, same rank): {verdict}")
    print(f"(benchmark wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
