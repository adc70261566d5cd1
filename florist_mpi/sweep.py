"""`florist-mpi sweep-tau`: FLoRIST's global rank and downlink size for many τ, from a log.

    florist-mpi sweep-tau runs/demo.h5 --taus 0.8:1.0:0.01 --out runs/sweep

No retraining: the round's logged client adapters (log.client_adapters: true) are
aggregated once per module with FLoRIST at τ = 1. FLoRIST's global factors are
ordered by singular value, so the result for any τ < 1 is exactly the first r_g(τ)
columns of B and rows of A of the τ = 1 result; every τ is then a slice.
The run's federation.max_rank, if set, caps r_g as it did in the run.

`sweep_global_factors(run_path, round_index, taus)` yields each τ's global factors,
for evaluating the merged model per τ.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from florist_mpi.analysis import CLIENT_ADAPTERS_HINT, open_run
from florist_mpi.errors import UserError
from florist_mpi.storage import LogError

BYTES_PER_FLOAT = 4  # factors travel as fp32
MAX_TAUS = 10_000
DEFAULT_TAUS = "0.8:1.0:0.01"


def add_arguments(parser) -> None:
    parser.add_argument("log", metavar="RUN.h5", help="run log written with log.client_adapters: true")
    parser.add_argument("--round", type=int, default=None, help="round to re-aggregate (default: the last completed; -1 counts from the end)")
    parser.add_argument("--taus", default=DEFAULT_TAUS,
                        help=f"thresholds: START:STOP:STEP (STOP included when reached) or a comma list such as 0.8,0.9,1 (default {DEFAULT_TAUS})")
    parser.add_argument("--out", metavar="DIR", help="also write DIR/sweep.csv and DIR/sweep.png (created if missing)")
    parser.add_argument("--csv", action="store_true", help="print the sweep as CSV instead of a table")
    parser.add_argument("--verbose", action="store_true", help="also print the global rank of every module for every τ")
    parser.add_argument("--eval", action="store_true",
                        help="also evaluate each τ's global model with the run's evaluation (held-out loss or MMLU); "
                             "writes DIR/sweep_eval.png with --out")


# ---------------------------------------------------------------------- τ lists


def parse_taus(text: str) -> list[float]:
    """'0.8:1.0:0.01' (endpoint included when the steps reach it) or '0.8,0.9,1'; each τ in (0, 1]."""
    text = str(text).strip()
    if not text:
        raise UserError("--taus is empty: give START:STOP:STEP (e.g. 0.8:1.0:0.01) or a comma list (e.g. 0.8,0.9,1)")
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise UserError(f"--taus '{text}' is not START:STOP:STEP: use e.g. 0.8:1.0:0.01")
        start, stop, step = (_tau_number(p, text) for p in parts)
        if not step > 0:
            raise UserError(f"--taus '{text}' has step {step:g}: the step must be positive")
        if stop < start:
            raise UserError(f"--taus '{text}' stops before it starts: give START <= STOP")
        # Count steps with a relative tolerance so that 0.8:1.0:0.01 reaches 1.0 despite float error.
        count = int(math.floor((stop - start) / step * (1 + 1e-9) + 1e-9)) + 1
        if count > MAX_TAUS:
            raise UserError(f"--taus '{text}' gives {count} values (at most {MAX_TAUS}): use a larger step")
        values = [round(start + i * step, 12) for i in range(count)]
        if abs(values[-1] - stop) <= 1e-9 * max(1.0, abs(stop)):
            values[-1] = stop
    else:
        values = [_tau_number(p, text) for p in text.split(",") if p.strip()]
        if not values:
            raise UserError(f"--taus '{text}' holds no number: give e.g. 0.8,0.9,1")
    for tau in values:
        if not 0.0 < tau <= 1.0:
            raise UserError(f"--taus '{text}' includes {tau:g}: every τ must be in (0, 1]")
    unique = []
    for tau in values:
        if tau not in unique:
            unique.append(tau)
    return unique


def _tau_number(part: str, text: str) -> float:
    try:
        value = float(part.strip())
    except ValueError:
        raise UserError(f"--taus '{text}': '{part.strip()}' is not a number; use e.g. 0.8:1.0:0.01 or 0.8,0.9,1") from None
    if not math.isfinite(value):
        raise UserError(f"--taus '{text}': '{part.strip()}' is not a finite number")
    return value


# ------------------------------------------------------------------------- core


@dataclass
class FloristBasis:
    """FLoRIST at τ = 1 over one logged round's client adapters: every τ is a prefix of it."""

    path: Path
    round_index: int
    run_method: str
    run_tau: float
    max_rank: int | None
    num_clients: int  # every client receives the global factors
    weights: dict[int, int]  # aggregated client id -> n_k
    modules: list[str]
    shapes: dict[str, tuple[int, int]]
    factors: dict[str, tuple[np.ndarray, np.ndarray]]  # τ = 1 global factors (read-only float32)
    spectra: dict[str, np.ndarray]  # float64, descending
    logged_ranks: dict[str, int]

    def rank(self, module: str, tau: float) -> int:
        from florist_mpi.aggregation import select_rank

        rank = select_rank(self.spectra[module], tau, self.max_rank)
        return min(rank, self.factors[module][0].shape[1])

    def energy(self, module: str, rank: int) -> float:
        energy = self.spectra[module] ** 2
        total = float(energy.sum())
        return 1.0 if total <= 0.0 else float(energy[:rank].sum()) / total

    def factors_at(self, tau: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Module -> (B[:, :r_g], A[:r_g]) for τ (read-only views)."""
        out = {}
        for module in self.modules:
            B, A = self.factors[module]
            r = self.rank(module, tau)
            out[module] = (B[:, :r], A[:r])
        return out


def florist_basis(run_path: str | Path, round_index: int | None = None) -> FloristBasis:
    """Aggregate a logged round's client adapters with FLoRIST at τ = 1 (one aggregation per module)."""
    import torch

    from florist_mpi.aggregation import aggregate_adapter

    run = open_run(run_path)
    r = run.resolve_round(round_index)
    adapters = run.client_adapters(r)  # LogError with the rerun hint when they were not logged
    weights = run.aggregation_weights(r)
    if not weights:
        raise LogError(f"round {r} of log '{run.path}' aggregated no client: pick another --round")
    missing = [c for c in weights if c not in adapters]
    if missing:
        raise LogError(f"log '{run.path}' round {r} lacks client adapters of aggregated client(s) "
                       f"{', '.join(map(str, missing))}: the log is incomplete; {CLIENT_ADAPTERS_HINT}")
    ids = list(weights)
    per_module = {}
    for module in run.modules:
        absent = [c for c in ids if module not in adapters[c]]
        if absent:
            raise LogError(f"log '{run.path}' round {r}: client {absent[0]} has no adapter for module '{module}': "
                           "the log is incomplete; use an intact copy")
        per_module[module] = [(torch.from_numpy(np.ascontiguousarray(adapters[c][module][0])),
                               torch.from_numpy(np.ascontiguousarray(adapters[c][module][1]))) for c in ids]
    try:
        results = aggregate_adapter("florist", per_module, [weights[c] for c in ids], tau=1.0)
    except ValueError as err:  # shapes or non-finite values the runner would never have logged
        raise LogError(f"log '{run.path}' round {r}: the client adapters cannot be aggregated ({err})") from None
    factors, spectra = {}, {}
    for module in run.modules:
        result = results[module]
        B = result.B.float().contiguous().numpy()
        A = result.A.float().contiguous().numpy()
        B.flags.writeable = False
        A.flags.writeable = False
        factors[module] = (B, A)
        spectra[module] = result.singular_values.double().cpu().numpy()
    return FloristBasis(
        path=run.path, round_index=r, run_method=run.method, run_tau=run.tau,
        max_rank=run.config.federation.max_rank, num_clients=run.num_clients, weights=weights,
        modules=list(run.modules), shapes=dict(run.module_shapes), factors=factors, spectra=spectra,
        logged_ranks=run.ranks[r].to_dict(),
    )


def _as_taus(taus) -> list[float]:
    if isinstance(taus, str):
        return parse_taus(taus)
    values = [float(t) for t in (taus if isinstance(taus, Iterable) else [taus])]
    for tau in values:
        if not 0.0 < tau <= 1.0:
            raise UserError(f"tau {tau:g} is out of range: every τ must be in (0, 1]")
    return values


def sweep_global_factors(run_path: str | Path, round_index: int | None, taus) -> Iterator[tuple[float, dict[str, tuple[np.ndarray, np.ndarray]]]]:
    """Yield (τ, module -> (B, A)) for each τ: FLoRIST's global factors for the logged round's
    client adapters at that τ (float32, read-only views; B @ A is the ΔW FLoRIST would merge).

    `round_index` None means the last completed round; `taus` is a list of floats or a
    --taus string. The aggregation runs once, before the first value is yielded.
    """
    values = _as_taus(taus)
    basis = florist_basis(run_path, round_index)
    for tau in values:
        yield tau, basis.factors_at(tau)


def sweep_table(basis: FloristBasis, taus: list[float]):
    """One row per τ (pandas DataFrame): ranks, energies and downlink size, plus per-module columns."""
    import pandas as pd

    rows = []
    for tau in taus:
        ranks = {m: basis.rank(m, tau) for m in basis.modules}
        energies = {m: basis.energy(m, ranks[m]) for m in basis.modules}
        params = sum(ranks[m] * (basis.shapes[m][0] + basis.shapes[m][1]) for m in basis.modules)
        count = max(len(basis.modules), 1)
        row = {
            "tau": tau,
            "total_rank": sum(ranks.values()),
            "mean_rank": sum(ranks.values()) / count,
            "min_rank": min(ranks.values(), default=0),
            "max_rank": max(ranks.values(), default=0),
            "mean_energy": sum(energies.values()) / count,
            "min_energy": min(energies.values(), default=1.0),
            "down_params_per_client": params,
            "down_bytes_per_client": BYTES_PER_FLOAT * params,
            "down_bytes_total": BYTES_PER_FLOAT * params * basis.num_clients,
        }
        row.update({f"rank:{m}": ranks[m] for m in basis.modules})
        row.update({f"energy:{m}": energies[m] for m in basis.modules})
        rows.append(row)
    return pd.DataFrame(rows)


def evaluate_taus(basis: FloristBasis, taus: list[float]) -> list[tuple[float, float]]:
    """(eval loss, accuracy) of each τ's global model: the base after the earlier rounds plus
    that τ's FLoRIST update of this round, evaluated as the run evaluated (one process)."""
    from florist_mpi import replay
    from florist_mpi.model import adapted_modules

    cfg = replay.logged_config(basis.path)
    model, tokenizer = replay.load_initial_base(cfg)
    modules = adapted_modules(model, cfg.lora.target_modules)
    replay.merge_rounds_before(modules, basis.path, cfg, basis.round_index)
    evaluate = replay.Evaluator(cfg, model, tokenizer)
    results = []
    for tau in taus:
        with replay.temporarily_merged(modules, basis.factors_at(tau)):
            results.append(evaluate())
    return results


def _plot_eval(basis: FloristBasis, table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from florist_mpi.report import byte_unit

    metric = "eval_accuracy" if table["eval_accuracy"].notna().any() else "eval_loss"
    label = "MMLU accuracy" if metric == "eval_accuracy" else "held-out loss (nats/token)"
    scale, unit = byte_unit(float(table["down_bytes_total"].max()))
    with plt.rc_context({"figure.dpi": 110, "savefig.bbox": "tight"}):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        x = table["down_bytes_total"] / scale
        ax.plot(x, table[metric], marker="o", ms=4)
        for xi, yi, tau in zip(x, table[metric], table["tau"]):
            ax.annotate(f"τ={tau:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(f"downlink per round ({unit}, fp32, {basis.num_clients} clients)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{basis.path.stem}, round {basis.round_index}: {label.split(' (')[0]} vs downlink across τ")
        fig.savefig(path)
        plt.close(fig)


# -------------------------------------------------------------------------- CLI


def main(args) -> int:
    from florist_mpi.report import byte_unit, format_table, short_module_names

    taus = parse_taus(args.taus)
    out = _out_dir(args.out) if args.out else None
    basis = florist_basis(args.log, args.round)
    table = sweep_table(basis, taus)
    if args.eval:
        evaluated = evaluate_taus(basis, taus)
        table.insert(1, "eval_loss", [loss for loss, _ in evaluated])
        table.insert(2, "eval_accuracy", [accuracy for _, accuracy in evaluated])

    if args.csv:
        table.to_csv(sys.stdout, index=False, float_format="%.10g")
    else:
        print(_header(basis))
        per_client_scale, per_client_unit = byte_unit(float(table["down_bytes_per_client"].max()))
        total_scale, total_unit = byte_unit(float(table["down_bytes_total"].max()))
        rows = []
        for row in table.to_dict(orient="records"):
            mark = " *" if basis.run_method == "florist" and abs(row["tau"] - basis.run_tau) < 1e-12 else ""
            rows.append([f"{row['tau']:g}{mark}", str(row["total_rank"]), f"{row['mean_rank']:.2f}",
                         f"{row['min_rank']}/{row['max_rank']}", f"{row['mean_energy']:.4f}", f"{row['min_energy']:.4f}",
                         str(row["down_params_per_client"]), f"{row['down_bytes_per_client'] / per_client_scale:.3f}",
                         f"{row['down_bytes_total'] / total_scale:.3f}"])
            if args.eval:
                rows[-1].insert(1, f"{row['eval_accuracy']:.4f}" if row["eval_accuracy"] == row["eval_accuracy"]
                                else f"{row['eval_loss']:.4f}")
        headers = ["tau", "total rank", "mean rank", "min/max", "mean energy", "min energy", "down params/client",
                   f"down {per_client_unit}/client", f"down {total_unit} ({basis.num_clients} clients)"]
        if args.eval:
            headers.insert(1, "eval acc" if table["eval_accuracy"].notna().any() else "eval loss")
        print(format_table(headers, rows))
        if basis.run_method == "florist" and any(abs(t - basis.run_tau) < 1e-12 for t in taus):
            print("* the run's own τ")
        if args.verbose:
            names = short_module_names(basis.modules)
            module_rows = [[name, *(str(table[f"rank:{m}"].iloc[i]) for i in range(len(taus)))]
                           for name, m in zip(names, basis.modules)]
            print("\nglobal rank per module and τ")
            print(format_table(["module", *(f"{t:g}" for t in taus)], module_rows))
    if out is not None:
        csv_path, png_path = out / "sweep.csv", out / "sweep.png"
        table.to_csv(csv_path, index=False, float_format="%.10g")
        _plot(basis, table, png_path)
        if args.eval:
            _plot_eval(basis, table, out / "sweep_eval.png")
        print(f"wrote {csv_path} and {png_path}", file=sys.stderr if args.csv else sys.stdout)
    return 0


def _header(basis: FloristBasis) -> str:
    logged_total = sum(basis.logged_ranks.values())
    own = (f"the run used FLoRIST with τ={basis.run_tau:g}" if basis.run_method == "florist"
           else f"the run used {basis.run_method}; rows show FLoRIST on the same client factors")
    cap = f", federation.max_rank {basis.max_rank} applied" if basis.max_rank else ""
    return (f"{basis.path} round {basis.round_index}: FLoRIST over {len(basis.weights)} aggregated clients, "
            f"{len(basis.modules)} modules{cap}\n{own} (logged total rank {logged_total})")


def _out_dir(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out '{path}' exists and is not a directory: give a directory for sweep.csv and sweep.png")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --out directory '{path}' ({err.strerror}): choose a writable location") from None
    return path


def _plot(basis: FloristBasis, table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from florist_mpi.report import byte_unit

    scale, unit = byte_unit(float(table["down_bytes_total"].max()))
    with plt.rc_context({"figure.dpi": 110, "savefig.bbox": "tight"}):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        tau = table["tau"].to_numpy()
        rank_line = ax.plot(tau, table["mean_rank"], marker="o", ms=3, color="tab:blue", label="mean global rank r_g")
        ax.set_xlabel("energy threshold τ")
        ax.set_ylabel("mean global rank r_g over modules", color="tab:blue")
        ax.tick_params(axis="y", labelcolor="tab:blue")
        ax.grid(True, alpha=0.3)
        twin = ax.twinx()
        down_line = twin.plot(tau, table["down_bytes_total"] / scale, marker="s", ms=3, ls="--", color="tab:orange",
                              label=f"downlink per round, {basis.num_clients} clients")
        twin.set_ylabel(f"downlink per round ({unit}, fp32)", color="tab:orange")
        twin.tick_params(axis="y", labelcolor="tab:orange")
        handles = rank_line + down_line
        if basis.run_method == "florist" and tau.min() <= basis.run_tau <= tau.max():
            handles.append(ax.axvline(basis.run_tau, color="0.3", ls=":", lw=1.2, label=f"run's τ = {basis.run_tau:g}"))
        ax.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=8, loc="upper left")
        ax.set_title(f"{basis.path.stem}, round {basis.round_index}: FLoRIST rank and downlink vs τ")
        fig.savefig(path)
        plt.close(fig)
