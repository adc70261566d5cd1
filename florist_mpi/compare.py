"""`florist-mpi compare-methods`: every registered aggregator on the same logged client updates.

    florist-mpi compare-methods runs/demo.h5 --round 3 --taus 0.8,0.9,0.95,1.0 --plots runs/compare

One logged round's client adapters (log.client_adapters: true) are aggregated again with
every method of the registry (florist_mpi.methods.names()), the ones whose global rank
depends on τ (Method.uses_tau: FLoRIST) once per τ, each with the round's weights
p_k = n_k / Σ n and the run's federation.max_rank. Since every method sees the same updates,
the differences isolate the aggregator from training noise. Per method (and τ) a row holds:

  relative_error   ‖G − ΔW‖_F / ‖ΔW‖_F over all modules (sqrt of the sums of squares), with
                   ΔW = Σ_k p_k B_k A_k the exact update and G the method's global update:
                   B @ A, plus residual[0] @ residual[1] where the result carries a residual
                   (florist_mpi.update_distance; no m×n matrix is formed); and per module
  global_rank      per module, their mean and sum (and the residual's rank where there is one)
  bytes_down       fp32 bytes sent to every registered client, with the method's accounting:
                   Method.downlink_floats(r_g, r_k, m, n, residual_rank) where the method has it,
                   else wire_floats(download_rank(r_g, r_k)) (+ the residual's wire_floats)
  bytes_up         fp32 bytes the aggregated clients uploaded: Σ_k wire_floats(r_k, m, n)
  server_flops     Σ_modules Method.server_flops(m, n, K, R, r_max, r_g), the simulated clock's figure
  client_truncation_errors  where the result sets client_ranks (each client receives a prefix):
                   ‖ΔW − B[:, :r_k] A[:r_k]‖_F / ‖ΔW‖_F per aggregated client, over all modules.

A method that cannot aggregate these updates keeps its row with `note` saying why and no
numbers: FFA-LoRA on a log whose clients trained their own A (any run but an ffa one; its
aggregation requires the shared frozen A).

Output: a table (default), `--json` (one object, fields in docs/analysis.md), `--plots DIR`
(compare_methods.png: error versus downlink, one labelled point per row; with --eval also
compare_methods_eval.png), `--eval` (each row's global model evaluated as sweep-tau --eval
does: replay.evaluate_updates). The JSON document is built here (comparison_document); the table
and the plots, read from it, live in compare_output.py.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from florist_mpi import methods
from florist_mpi.analysis import CLIENT_ADAPTERS_HINT, Run, open_run
from florist_mpi.storage import LogError

BYTES_PER_FLOAT = 4  # factors travel as fp32
DEFAULT_TAUS = "0.8,0.9,0.95,1.0"


def add_arguments(parser) -> None:
    parser.add_argument("log", metavar="RUN.h5", help="run log written with log.client_adapters: true")
    parser.add_argument(
        "--round", type=int, default=None,
        help="round whose client adapters are re-aggregated (default: the last completed; -1 counts from the end)",
    )
    parser.add_argument(
        "--taus", default=DEFAULT_TAUS,
        help="thresholds for the methods that use τ (FLoRIST): a comma list or START:STOP:STEP, "
        f"each in (0, 1] (default {DEFAULT_TAUS})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--plots", metavar="DIR",
        help="also write DIR/compare_methods.png (relative error versus downlink; created if missing)",
    )
    parser.add_argument(
        "--eval", action="store_true",
        help="also evaluate each method's global model with the run's evaluation (held-out loss or MMLU), "
        "as sweep-tau --eval does",
    )
    parser.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default=None,
        help="where --eval runs the model: default the run's run.device (auto: a GPU where this machine has one)",
    )


# ---------------------------------------------------------------------- the round


@dataclass
class LoggedRound:
    """One logged round's client updates, as every method receives them."""

    path: Path
    round_index: int
    run_method: str
    run_tau: float
    max_rank: int | None
    modules: list[str]
    shapes: dict[str, tuple[int, int]]
    weights: dict[int, int]  # aggregated client id -> n_k, in aggregation order
    registered_ranks: list[int]  # LoRA rank of every registered client: the downlink goes to all
    factors: dict[str, list]  # module -> [(B_k, A_k) float32 tensors per aggregated client]
    logged_bytes_down: int
    logged_bytes_up: int

    @property
    def p(self) -> np.ndarray:
        n = np.array(list(self.weights.values()), dtype=np.float64)
        return n / n.sum()

    def client_ranks(self, module: str) -> list[int]:
        return [int(B.shape[1]) for B, _ in self.factors[module]]


def load_round(run: Run, round_index: int | None) -> LoggedRound:
    """The round's aggregated clients and their logged factors; a LogError (one line) when the log
    lacks them."""
    from florist_mpi.sweep import client_factor_pairs

    r = run.resolve_round(round_index)
    if not run.has_client_adapters(r):
        raise LogError(f"log '{run.path}' has no client adapters for round {r}, and compare-methods "
                       f"re-aggregates them: {CLIENT_ADAPTERS_HINT}")
    weights = run.aggregation_weights(r)
    if not weights:
        raise LogError(f"round {r} of log '{run.path}' aggregated no client: pick another --round")
    cfg = run.config
    attrs = run.rounds.loc[r]
    return LoggedRound(
        path=run.path, round_index=r, run_method=run.method, run_tau=run.tau, max_rank=cfg.federation.max_rank,
        modules=list(run.modules), shapes=dict(run.module_shapes), weights=weights,
        registered_ranks=[cfg.lora.rank_of(c) for c in range(run.num_clients)],
        factors=client_factor_pairs(run, r, weights),
        logged_bytes_down=int(attrs["bytes_down"]), logged_bytes_up=int(attrs["bytes_up"]),
    )


# ------------------------------------------------------------------------ rows


@dataclass
class Row:
    """One method (at one τ) on the round; sums over modules are accumulated module by module."""

    method: str
    tau: float | None
    note: str | None = None
    module_errors: dict[str, float | None] = field(default_factory=dict)
    global_rank: dict[str, int] = field(default_factory=dict)
    residual_rank: dict[str, int] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    server_flops: float = 0.0
    error_squares: float = 0.0
    truncation_squares: dict[int, float] | None = None  # client id -> Σ_modules ‖ΔW − prefix‖²
    factors: dict[str, tuple] | None = None  # module -> (B, A) of the global update, kept for --eval
    eval_loss: float | None = None
    eval_accuracy: float | None = None

    @property
    def label(self) -> str:
        return self.method if self.tau is None else f"{self.method} τ={self.tau:g}"

    def document(self, delta_squares: float) -> dict:
        """The row's JSON fields (docs/analysis.md)."""
        ok = self.note is None
        ranks = list(self.global_rank.values())
        truncation = None
        if ok and self.truncation_squares is not None:
            truncation = {str(c): _relative(s, delta_squares) for c, s in self.truncation_squares.items()}
        return {
            "method": self.method,
            "tau": self.tau,
            "relative_error": _relative(self.error_squares, delta_squares) if ok else None,
            "module_errors": self.module_errors if ok else None,
            "global_rank": self.global_rank if ok else None,
            "mean_global_rank": float(np.mean(ranks)) if ok and ranks else None,
            "total_global_rank": int(sum(ranks)) if ok else None,
            "residual_rank": self.residual_rank if ok and self.residual_rank else None,
            "bytes_down": self.bytes_down if ok else None,
            "bytes_up": self.bytes_up if ok else None,
            "server_flops": self.server_flops if ok else None,
            "client_truncation_errors": truncation,
            "eval_loss": _finite_or_none(self.eval_loss),
            "eval_accuracy": _finite_or_none(self.eval_accuracy),
            "note": self.note,
        }


def _relative(square: float, delta_square: float) -> float | None:
    if delta_square > 0:
        return math.sqrt(square / delta_square)
    return 0.0 if square == 0 else None


def _finite_or_none(value) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def method_rows(taus: list[float]) -> list[Row]:
    """One row per registered method, per τ for those that use it, in registry order."""
    rows = []
    for name in methods.names():
        method = methods.get(name)
        rows += [Row(name, tau) for tau in taus] if method.uses_tau else [Row(name, None)]
    return rows


def compare(logged: LoggedRound, taus: list[float], keep_factors: bool = False) -> tuple[list[Row], dict[str, float]]:
    """Every row over every module; returns the rows and ‖ΔW‖_F per module. `keep_factors` keeps each
    row's global factors (float32, module -> (B, A) with the residual appended) for --eval."""
    from florist_mpi.update_distance import ExactUpdate

    rows, delta_norms = method_rows(taus), {}
    p = logged.p
    for module in logged.modules:
        pairs = logged.factors[module]
        exact = ExactUpdate(pairs, p)
        delta_norms[module] = exact.norm
        for row in rows:
            if row.note is None:
                _measure(row, logged, module, pairs, exact, keep_factors)
    return rows, delta_norms


def _measure(row: Row, logged: LoggedRound, module: str, pairs, exact, keep_factors: bool) -> None:
    """Aggregate one module with the row's method and add its error, ranks, bytes and FLOPs to the row."""
    import torch

    from florist_mpi.aggregation import aggregate

    method = methods.get(row.method)
    try:
        result = aggregate(method, pairs, list(logged.weights.values()), tau=row.tau or 1.0,
                           max_rank=logged.max_rank)
    except ValueError as err:  # e.g. ffa on clients that trained their own A
        row.note = f"not applicable to these updates: {err}"
        row.factors = None
        return
    B, A = result.B, result.A
    residual = getattr(result, "residual", None)  # FedEx: low-rank factors of ΔW − B A, also sent
    residual_rank = int(residual[0].shape[1]) if residual is not None else 0
    full_B = torch.cat([B, residual[0].to(B.dtype)], dim=1) if residual_rank else B
    full_A = torch.cat([A, residual[1].to(A.dtype)], dim=0) if residual_rank else A
    prefixes = result.client_ranks.tolist() if result.client_ranks is not None else []
    error, truncated = exact.distances(full_B, full_A, prefixes)
    row.error_squares += error**2
    row.module_errors[module] = error / exact.norm if exact.norm > 0 else (0.0 if error == 0 else None)
    row.global_rank[module] = int(result.rank)
    if residual is not None:
        row.residual_rank[module] = residual_rank
    if result.client_ranks is not None:
        row.truncation_squares = row.truncation_squares or {c: 0.0 for c in logged.weights}
        for client, r in zip(logged.weights, prefixes):
            row.truncation_squares[client] += truncated[r] ** 2
    m, n = logged.shapes[module]
    ranks = logged.client_ranks(module)
    row.bytes_up += BYTES_PER_FLOAT * sum(method.wire_floats(r, m, n) for r in ranks)
    row.bytes_down += BYTES_PER_FLOAT * sum(
        downlink_floats(method, int(result.rank), r_k, m, n, residual_rank) for r_k in logged.registered_ranks
    )
    row.server_flops += float(method.server_flops(m, n, len(ranks), sum(ranks), max(ranks), int(result.rank)))
    if keep_factors:
        row.factors = row.factors if row.factors is not None else {}
        row.factors[module] = (full_B.float().contiguous(), full_A.float().contiguous())


def downlink_floats(method, global_rank: int, client_rank: int, m: int, n: int, residual_rank: int = 0) -> int:
    """Floats one client receives for one module: the method's own downlink_floats where it defines one
    (FedEx counts its residual there), else its wire_floats at its download_rank, plus the residual's."""
    hook = getattr(method, "downlink_floats", None)
    if hook is not None:
        return int(hook(global_rank, client_rank, m, n, residual_rank=residual_rank))
    floats = method.wire_floats(method.download_rank(global_rank, client_rank), m, n)
    return floats + (method.wire_floats(residual_rank, m, n) if residual_rank else 0)


def evaluate_rows(logged: LoggedRound, rows: list[Row], device: str | None) -> None:
    """Each applicable row's global model, base + its update, evaluated as sweep-tau --eval does."""
    from florist_mpi import replay

    usable = [row for row in rows if row.note is None and row.factors is not None]
    results = replay.evaluate_updates(logged.path, logged.round_index, (row.factors for row in usable), device)
    for row, (loss, accuracy) in zip(usable, results):
        row.eval_loss, row.eval_accuracy = loss, accuracy


# --------------------------------------------------------------------- document


def comparison_document(logged: LoggedRound, taus: list[float], rows: list[Row], delta_norms: dict[str, float]) -> dict:
    """The --json object (docs/analysis.md)."""
    delta_squares = sum(v**2 for v in delta_norms.values())
    p = logged.p
    first = logged.modules[0]
    return {
        "log": str(logged.path),
        "round": logged.round_index,
        "run_method": logged.run_method,
        "run_tau": logged.run_tau,
        "max_rank": logged.max_rank,
        "taus": taus,
        "clients": [
            {"id": c, "num_samples": n, "weight": float(pk), "rank": r}
            for (c, n), pk, r in zip(logged.weights.items(), p, logged.client_ranks(first))
        ],
        "num_clients": len(logged.registered_ranks),
        "modules": {m: {"shape": list(logged.shapes[m]), "delta_norm": delta_norms[m]} for m in logged.modules},
        "delta_norm": math.sqrt(delta_squares),
        "logged_bytes_down": logged.logged_bytes_down,
        "logged_bytes_up": logged.logged_bytes_up,
        "methods": [row.document(delta_squares) for row in rows],
    }


# -------------------------------------------------------------------------- CLI


def main(args) -> int:
    from florist_mpi.report.formatting import plots_dir
    from florist_mpi.sweep import parse_taus

    taus = parse_taus(args.taus)
    run = open_run(args.log)
    logged = load_round(run, args.round)
    plot_dir = plots_dir(args.plots) if args.plots else None
    rows, delta_norms = compare(logged, taus, keep_factors=args.eval)
    if args.eval:
        evaluate_rows(logged, rows, args.device)
    document = comparison_document(logged, taus, rows, delta_norms)
    from florist_mpi import compare_output

    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(compare_output.text_table(document))
    if plot_dir is not None:
        written = compare_output.write_plots(document, plot_dir)
        note = sys.stderr if args.json else sys.stdout  # --json keeps stdout one JSON object
        print(f"wrote {', '.join(str(p) for p in written)}", file=note)
    return 0
