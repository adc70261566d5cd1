"""Many tiny clients: FLoRIST's server side against forming every module's ΔW with one einsum.

    python benchmarks/aggregation.py --many-clients [--clients 10000] [--client-rank 8] [--repeats 5]
    python benchmarks/aggregation_many.py [--clients 10000] [--client-rank 8] [--repeats 5]

K clients of rank r on the 15 adapted modules of the demo model (configs/demo.yaml: hidden 64,
intermediate 128, vocab 512, 2 layers; q/k/v/o 64×64, gate/up 128×64, down 64×128, lm_head 512×64),
float32 factors with decaying column scales, sample counts 100…499, τ = 0.9. Timed side by side in
one process, interleaved rounds; the ratios are the medians of the rounds' ratios:
  einsum  every module's ΔW = Σ_k p_k B_k A_k with one batched einsum ("k,kmr,krn->mn") on
          K×m×r and K×r×n tensors (float32): the arithmetic floor of any exact method;
  stack   aggregate_adapter("florist", {module: ClientStack}, n_k): B as the transpose of a
          contiguous R×m buffer (how the MPI exchange delivers it), A as R×n;
  pairs   aggregate_adapter("florist", {module: [(B_k, A_k), …]}, n_k): K separate tensors a module.
Target: stack and pairs each ≤ 3× the einsum. The two forms must agree (same ranks, probe).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from florist_mpi.aggregation import ClientStack, aggregate_adapter

HIDDEN, INTERMEDIATE, VOCAB, LAYERS = 64, 128, 512, 2
TAU = 0.9


def demo_shapes() -> dict[str, tuple[int, int]]:
    """(out m, in n) of every adapted module of the demo model, in model order."""
    per_layer = {
        "self_attn.q_proj": (HIDDEN, HIDDEN),
        "self_attn.k_proj": (HIDDEN, HIDDEN),
        "self_attn.v_proj": (HIDDEN, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
        "mlp.up_proj": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj": (HIDDEN, INTERMEDIATE),
    }
    shapes = {f"model.layers.{i}.{name}": shape for i in range(LAYERS) for name, shape in per_layer.items()}
    shapes["lm_head"] = (VOCAB, HIDDEN)
    return shapes


def make_clients(shapes, clients: int, rank: int, device: str, seed: int = 0):
    """Per module: (B3 K×m×r, A3 K×r×n) float32, decaying column scales."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, rank)
    out = {}
    for name, (m, n) in shapes.items():
        B3 = torch.randn(clients, m, rank, generator=g) * scale / m**0.5
        A3 = torch.randn(clients, rank, n, generator=g) / n**0.5
        out[name] = (B3.to(device), A3.to(device))
    return out


def as_stacks(factors, rank: int) -> dict[str, ClientStack]:
    """The exchange's layout: Bᵀ as one contiguous R×m buffer (B = its transpose, a view), A as R×n."""
    stacks = {}
    for name, (B3, A3) in factors.items():
        K, m, r = B3.shape
        buffer = B3.transpose(1, 2).reshape(K * r, m).contiguous()  # client k's rows: B_kᵀ
        stacks[name] = ClientStack(buffer.T, A3.reshape(K * r, -1), torch.full((K,), rank))
    return stacks


def as_pairs(factors) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    return {name: [(B3[k].clone(), A3[k].clone()) for k in range(B3.shape[0])] for name, (B3, A3) in factors.items()}


def einsum_updates(factors, p: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: torch.einsum("k,kmr,krn->mn", p, B3, A3) for name, (B3, A3) in factors.items()}


def probe_difference(a, b, n_of) -> float:
    worst = 0.0
    for name, result in a.items():
        probe = torch.randn(n_of[name][1], 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        ya = result.B.double() @ (result.A.double() @ probe.to(result.A.device))
        yb = b[name].B.double() @ (b[name].A.double() @ probe.to(result.A.device))
        worst = max(worst, float((ya - yb).norm() / yb.norm()))
    return worst


def run_many_clients(clients: int, rank: int, repeats: int, device: str) -> None:
    started = time.perf_counter()
    shapes = demo_shapes()
    threads = f"{torch.get_num_threads()} threads" if device == "cpu" else torch.cuda.get_device_name()
    print(
        f"{clients} clients of rank {rank}, {len(shapes)} modules of the demo model "
        f"({min(m for m, _ in shapes.values())}-{max(m for m, _ in shapes.values())} x 64-128), tau={TAU}, "
        f"torch {torch.__version__}, {device} ({threads})",
        flush=True,
    )
    factors = make_clients(shapes, clients, rank, device)
    stacks, pairs = as_stacks(factors, rank), as_pairs(factors)
    samples = [100 + (37 * k) % 400 for k in range(clients)]
    p = torch.tensor(samples, dtype=torch.float32, device=device)
    p = p / p.sum()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    runs = {
        "einsum": lambda: einsum_updates(factors, p),
        "stack": lambda: aggregate_adapter("florist", stacks, samples, tau=TAU),
        "pairs": lambda: aggregate_adapter("florist", pairs, samples, tau=TAU),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    results = {}
    for _ in range(repeats):  # interleaved: the same machine state for all three
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            results[name] = run()
            sync()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    stack, pair = results["stack"], results["pairs"]
    same_ranks = all(stack[name].rank == pair[name].rank for name in shapes)
    difference = probe_difference(stack, pair, shapes)
    if not same_ranks or difference > 1e-6:
        raise SystemExit(f"stack and pairs forms disagree: ranks equal {same_ranks}, probe difference {difference:.1e}")
    print(f"global ranks: {sorted({r.rank for r in stack.values()})}; stack vs pairs probe difference {difference:.0e}")
    print()
    # each round runs the three one after another: the median of the rounds' ratios pairs like with like
    ratio = {
        name: statistics.median(t / e for t, e in zip(times[name], times["einsum"])) for name in ("stack", "pairs")
    }
    ratio["einsum"] = 1.0
    print(f"| {repeats} interleaved rounds | median (s) | all rounds (s) | vs einsum (median of the rounds' ratios) |")
    print("| --- | --- | --- | --- |")
    for name, label in (
        ("einsum", "every module's ΔW, one batched einsum (float32)"),
        ("stack", "aggregate_adapter, ClientStack per module"),
        ("pairs", f"aggregate_adapter, {clients} (B, A) pairs per module"),
    ):
        spread = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"| {label} | {median[name]:.3f} | {spread} | {ratio[name]:.2f}x |")
    print()
    verdict = {name: "met" if ratio[name] <= 3 else "NOT met" for name in ("stack", "pairs")}
    print(f"target <= 3x the einsum: stack {verdict['stack']}, pairs {verdict['pairs']}")
    print(f"(benchmark wall time {time.perf_counter() - started:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--client-rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    run_many_clients(args.clients, args.client_rank, args.repeats, args.device)


if __name__ == "__main__":
    main()
