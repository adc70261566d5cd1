"""`florist-mpi sweep-tau`: FLoRIST's global rank and downlink size for many τ, from a log.

    florist-mpi sweep-tau runs/demo.h5 --taus 0.8:1.0:0.01 --out runs/sweep

No retraining: the round's logged client adapters (log.client_adapters: true) are
aggregated once per module with FLoRIST at τ = 1. FLoRIST's global factors are
ordered by singular value, so the result for any τ < 1 is exactly the first r_g(τ)
columns of B and rows of A of the τ = 1 result; every τ is then a slice.
The run's federation.max_rank, if set, caps r_g as it did in the run.

Without client adapters, a log whose global update is the exact ΔW = Σ p_k B_k A_k is
swept from that update alone (one "client" of weight 1; FLoRIST depends on the clients
only through ΔW): flora (its global factors are the stacks B_s, A_s with p_k folded in),
ffa (the averaged B times the shared frozen A) and florist run at τ = 1 without a
max_rank cap. Any other log needs log.client_adapters: true.

sweep.csv (the table), sweep.json (its source, and the sweep's downlink at the run's τ
beside the round's logged bytes_down) and sweep.png are always written: to --out, else to
`<log stem>_sweep_tau/` beside the log; a folder that holds files is never overwritten.

`sweep_global_factors(run_path, round_index, taus)` yields each τ's global factors,
for evaluating the merged model per τ.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from florist_mpi import methods
from florist_mpi.analysis import CLIENT_ADAPTERS_HINT, Run, check_new_output_dir, open_run, publishing_dir
from florist_mpi.errors import UserError
from florist_mpi.storage import LogError

BYTES_PER_FLOAT = 4  # factors travel as fp32
MAX_TAUS = 10_000
DEFAULT_TAUS = "0.8:1.0:0.01"
CLIENT_ADAPTERS = "the logged client adapters"  # FloristBasis.source of the general case


def add_arguments(parser) -> None:
    parser.add_argument("log", metavar="RUN.h5",
                        help="run log written with log.client_adapters: true (or a flora/ffa run, or florist at τ = 1)")
    parser.add_argument(
        "--round",
        type=int,
        default=None,
        help="round to re-aggregate (default: the last completed; -1 counts from the end)",
    )
    parser.add_argument(
        "--taus",
        default=DEFAULT_TAUS,
        help="thresholds: START:STOP:STEP (STOP included when reached) or a comma list such as 0.8,0.9,1 "
        f"(default {DEFAULT_TAUS})",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="write DIR/sweep.csv and DIR/sweep.png (default: <log stem>_sweep_tau/ beside the log); "
        "DIR must be new or empty",
    )
    parser.add_argument("--csv", action="store_true", help="print the sweep as CSV instead of a table")
    parser.add_argument("--verbose", action="store_true", help="also print the global rank of every module for every τ")
    parser.add_argument(
        "--eval",
        action="store_true",
        help="also evaluate each τ's global model with the run's evaluation (held-out loss or MMLU); "
        "writes DIR/sweep_eval.png with --out",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default=None,
        help="where --eval runs the model: default the run's run.device (auto: a GPU where this machine has one); "
        "on a GPU in the run's model.dtype, as the run evaluated, on CPU in float32",
    )


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
        raise UserError(
            f"--taus '{text}': '{part.strip()}' is not a number; use e.g. 0.8:1.0:0.01 or 0.8,0.9,1"
        ) from None
    if not math.isfinite(value):
        raise UserError(f"--taus '{text}': '{part.strip()}' is not a finite number")
    return value


# ------------------------------------------------------------------------- core


@dataclass
class FloristBasis:
    """FLoRIST at τ = 1 over one logged round (its client adapters, or its exact global update):
    the result for every τ is a prefix of it."""

    path: Path
    round_index: int
    run_method: str
    run_tau: float
    max_rank: int | None
    num_clients: int  # every client receives the global factors
    weights: dict[int, int]  # aggregated client id -> n_k
    source: str  # what was aggregated: the client adapters or the logged exact global update
    modules: list[str]
    shapes: dict[str, tuple[int, int]]
    factors: dict[str, tuple[np.ndarray, np.ndarray]]  # τ = 1 global factors (read-only float32)
    spectra: dict[str, np.ndarray]  # float64, descending
    logged_ranks: dict[str, int]
    logged_bytes_down: int  # the round's bytes_down attribute, as the run sent it

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


def florist_basis(run_path: str | Path | Run, round_index: int | None = None) -> FloristBasis:
    """Aggregate a logged round with FLoRIST at τ = 1 (one aggregation per module).

    The round's client adapters when logged, else its global update when that is the exact
    ΔW (see the module docstring); otherwise a LogError that says to log client adapters.
    """
    from florist_mpi.aggregation import aggregate_adapter

    run = run_path if isinstance(run_path, Run) else open_run(run_path)
    r = run.resolve_round(round_index)
    weights = run.aggregation_weights(r)
    if not weights:
        raise LogError(f"round {r} of log '{run.path}' aggregated no client: pick another --round")
    if run.has_client_adapters(r):
        per_module, source = client_factor_pairs(run, r, weights), CLIENT_ADAPTERS
        client_weights = list(weights.values())
    else:
        source = exact_global_update(run)
        if source is None:
            raise LogError(
                f"log '{run.path}' has no client adapters for round {r} and its {run.method} global update "
                f"is not the exact ΔW (only flora, ffa and florist at τ = 1 log that): {CLIENT_ADAPTERS_HINT}"
            )
        global_factors = run.global_factors(r)
        per_module = {m: [_tensors(global_factors[m])] for m in run.modules}
        client_weights = [1.0]
    try:
        results = aggregate_adapter("florist", per_module, client_weights, tau=1.0)
    except ValueError as err:  # shapes or non-finite values the runner would never have logged
        raise LogError(f"log '{run.path}' round {r}: the logged factors cannot be aggregated ({err})") from None
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
        path=run.path,
        round_index=r,
        run_method=run.method,
        run_tau=run.tau,
        max_rank=run.config.federation.max_rank,
        num_clients=run.num_clients,
        weights=weights,
        source=source,
        modules=list(run.modules),
        shapes=dict(run.module_shapes),
        factors=factors,
        spectra=spectra,
        logged_ranks=run.ranks[r].to_dict(),
        logged_bytes_down=int(run.rounds.loc[r, "bytes_down"]),
    )


def exact_global_update(run) -> str | None:
    """How the run's logged global factors hold the exact ΔW = Σ p_k B_k A_k, or None if they do not."""
    return methods.get(run.method).exact_global_update(run)


def _tensors(pair):
    import torch

    return (torch.from_numpy(np.ascontiguousarray(pair[0])), torch.from_numpy(np.ascontiguousarray(pair[1])))


def client_factor_pairs(run, r: int, weights: dict[int, int]) -> dict[str, list]:
    """module -> [(B_k, A_k) per aggregated client, in `weights` order] from the round's client adapters."""
    adapters = run.client_adapters(r)
    missing = [c for c in weights if c not in adapters]
    if missing:
        raise LogError(
            f"log '{run.path}' round {r} lacks client adapters of aggregated client(s) "
            f"{', '.join(map(str, missing))}: the log is incomplete; {CLIENT_ADAPTERS_HINT}"
        )
    per_module = {}
    for module in run.modules:
        absent = [c for c in weights if module not in adapters[c]]
        if absent:
            raise LogError(
                f"log '{run.path}' round {r}: client {absent[0]} has no adapter for module '{module}': "
                "the log is incomplete; use an intact copy"
            )
        per_module[module] = [_tensors(adapters[c][module]) for c in weights]
    return per_module


def _as_taus(taus) -> list[float]:
    if isinstance(taus, str):
        return parse_taus(taus)
    values = [float(t) for t in (taus if isinstance(taus, Iterable) else [taus])]
    for tau in values:
        if not 0.0 < tau <= 1.0:
            raise UserError(f"tau {tau:g} is out of range: every τ must be in (0, 1]")
    return values


def sweep_global_factors(
    run_path: str | Path, round_index: int | None, taus
) -> Iterator[tuple[float, dict[str, tuple[np.ndarray, np.ndarray]]]]:
    """Yield (τ, module -> (B, A)) for each τ: FLoRIST's global factors for the logged round
    at that τ (float32, read-only views; B @ A is the ΔW FLoRIST would merge).

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


def evaluate_taus(basis: FloristBasis, taus: list[float], device: str | None = None) -> list[tuple[float, float]]:
    """(eval loss, accuracy) of each τ's global model: the base after the earlier rounds plus
    that τ's FLoRIST update of this round, evaluated as the run evaluated (one process), on
    `device` (auto, cuda or cpu; default: the run's run.device)."""
    from florist_mpi import replay

    return replay.evaluate_updates(basis.path, basis.round_index, (basis.factors_at(tau) for tau in taus), device)


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
    taus = parse_taus(args.taus)
    run = open_run(args.log)
    round_index = run.resolve_round(args.round)  # log and round problems are reported before folder ones
    out = Path(args.out) if args.out else default_out_dir(args.log)
    if args.out:
        check_new_output_dir(out, f"--out '{out}'")
    else:
        check_new_output_dir(out, f"the default sweep folder '{out}'", "pass --out NEW_DIR, or remove that folder")
    basis = florist_basis(run, round_index)
    table = sweep_table(basis, taus)
    if args.eval:
        evaluated = evaluate_taus(basis, taus, args.device)
        table.insert(1, "eval_loss", [loss for loss, _ in evaluated])
        table.insert(2, "eval_accuracy", [accuracy for _, accuracy in evaluated])
    info = sweep_info(basis)
    note = sys.stderr if args.csv else sys.stdout  # --csv keeps stdout pure CSV
    if run.config.system is not None:
        from florist_mpi.data import DataError

        try:
            table["sim_round_s"] = simulated_round_seconds(run, basis, taus)
        except DataError as err:  # e.g. the profile's CSV is not where the run read it
            print(f"no simulated round time: {UserError.one_line(err)}", file=note)
    if args.csv:
        table.to_csv(sys.stdout, index=False, float_format="%.10g")
    else:
        print(_text_table(basis, table, taus, args.eval, args.verbose))
    print(_run_tau_line(info), file=note)
    with publishing_dir(out) as scratch:
        table.to_csv(scratch / "sweep.csv", index=False, float_format="%.10g")
        (scratch / "sweep.json").write_text(json.dumps(info, indent=2) + "\n")
        _plot(basis, table, info, scratch / "sweep.png")
        if args.eval:
            _plot_eval(basis, table, scratch / "sweep_eval.png")
        written = sorted(p.name for p in scratch.iterdir())
    print(f"wrote {out}/: {', '.join(written)}", file=note)
    return 0


def simulated_round_seconds(run: Run, basis: FloristBasis, taus: list[float]) -> list[float]:
    """Simulated duration of a round in which the swept round's aggregated clients download
    each τ's global factors (runs with a system section; docs/simulated-clock.md).

    Per τ: FLoRIST's aggregation time at r_g(τ) + the largest, over those clients, of the
    download of the τ-sized factors (their profile's link) plus their logged compute and upload times.
    """
    from florist_mpi import simclock
    from florist_mpi.data import system_tables

    cfg = run.config
    profile = simclock.resolve_profile(
        cfg.system, cfg.federation.num_clients, cfg.run.seed, system_tables(cfg.system, cfg.federation.num_clients)
    )
    clients = run.clients(basis.round_index).set_index("id")
    kept = list(basis.weights)
    ranks_of = {c: cfg.lora.rank_of(c) for c in kept}
    result = []
    for tau in taus:
        global_ranks = {m: basis.rank(m, tau) for m in basis.modules}
        server = (
            simclock.aggregation_flops("florist", basis.shapes, list(ranks_of.values()), global_ranks)
            / cfg.system.server_flops
        )
        slowest = 0.0
        for c in kept:
            down = simclock.transfer_seconds(
                simclock.download_bytes("florist", basis.shapes, global_ranks, ranks_of[c]),
                profile.downlink_mbps[c],
                profile.latency_s[c],
            )
            slowest = max(slowest, down + float(clients.at[c, "sim_compute_s"]) + float(clients.at[c, "sim_upload_s"]))
        result.append(server + slowest)
    return result


def default_out_dir(log) -> Path:
    """`<log stem>_sweep_tau/` beside the log."""
    log = Path(log)
    return log.with_name(f"{log.stem}_sweep_tau")


def sweep_info(basis: FloristBasis) -> dict:
    """What the sweep was computed from, and the downlink at the run's τ next to the logged one."""
    at_run_tau = int(sweep_table(basis, [basis.run_tau])["down_bytes_total"].iloc[0])
    return {
        "log": str(basis.path),
        "round": basis.round_index,
        "method": basis.run_method,
        "run_tau": basis.run_tau,
        "max_rank": basis.max_rank,
        "source": basis.source,
        "aggregated_clients": list(basis.weights),
        "num_clients": basis.num_clients,
        "logged_total_rank": int(sum(basis.logged_ranks.values())),
        "logged_bytes_down": basis.logged_bytes_down,
        "sweep_bytes_down_at_run_tau": at_run_tau,
    }


def _run_tau_line(info: dict) -> str:
    from florist_mpi.report import byte_unit

    sweep, logged = info["sweep_bytes_down_at_run_tau"], info["logged_bytes_down"]
    scale, unit = byte_unit(max(sweep, logged))
    if info["method"] == "florist":
        verdict = "equal" if sweep == logged else f"differ by {sweep - logged:+d} B"
        return (
            f"downlink at the run's τ = {info['run_tau']:g}: sweep {sweep / scale:.3f} {unit} ({sweep} B), "
            f"logged bytes_down of round {info['round']} {logged / scale:.3f} {unit} ({logged} B): {verdict}"
        )
    return (
        f"logged bytes_down of round {info['round']} ({info['method']}): {logged / scale:.3f} {unit} ({logged} B); "
        f"FLoRIST at the run's τ = {info['run_tau']:g} would send {sweep / scale:.3f} {unit} ({sweep} B)"
    )


def _text_table(basis: FloristBasis, table, taus: list[float], with_eval: bool, verbose: bool) -> str:
    from florist_mpi.report import byte_unit, format_table, short_module_names

    per_client_scale, per_client_unit = byte_unit(float(table["down_bytes_per_client"].max()))
    total_scale, total_unit = byte_unit(float(table["down_bytes_total"].max()))
    accuracy = with_eval and table["eval_accuracy"].notna().any()
    rows = []
    for row in table.to_dict(orient="records"):
        mark = " *" if _is_run_tau(basis, row["tau"]) else ""
        rows.append(
            [
                f"{row['tau']:g}{mark}",
                str(row["total_rank"]),
                f"{row['mean_rank']:.2f}",
                f"{row['min_rank']}/{row['max_rank']}",
                f"{row['mean_energy']:.4f}",
                f"{row['min_energy']:.4f}",
                str(row["down_params_per_client"]),
                f"{row['down_bytes_per_client'] / per_client_scale:.3f}",
                f"{row['down_bytes_total'] / total_scale:.3f}",
            ]
        )
        if "sim_round_s" in row:
            rows[-1].append(f"{row['sim_round_s']:.4g}")
        if with_eval:
            rows[-1].insert(1, f"{row['eval_accuracy' if accuracy else 'eval_loss']:.4f}")
    headers = [
        "tau",
        "total rank",
        "mean rank",
        "min/max",
        "mean energy",
        "min energy",
        "down params/client",
        f"down {per_client_unit}/client",
        f"down {total_unit} ({basis.num_clients} clients)",
    ]
    if "sim_round_s" in table.columns:
        headers.append("sim round s")
    if with_eval:
        headers.insert(1, "eval acc" if accuracy else "eval loss")
    lines = [_header(basis), format_table(headers, rows)]
    if any(_is_run_tau(basis, t) for t in taus):
        lines.append("* the run's own τ")
    if "sim_round_s" in table.columns:
        lines.append(
            "sim round s: simulated round time if this round's aggregated clients downloaded the τ's "
            "global factors (their logged compute and upload, FLoRIST's aggregation at that rank)"
        )
    if verbose:
        names = short_module_names(basis.modules)
        module_rows = [
            [name, *(str(table[f"rank:{m}"].iloc[i]) for i in range(len(taus)))]
            for name, m in zip(names, basis.modules)
        ]
        lines += ["", "global rank per module and τ", format_table(["module", *(f"{t:g}" for t in taus)], module_rows)]
    return "\n".join(lines)


def _is_run_tau(basis: FloristBasis, tau: float) -> bool:
    return basis.run_method == "florist" and abs(tau - basis.run_tau) < 1e-12


def _header(basis: FloristBasis) -> str:
    logged_total = sum(basis.logged_ranks.values())
    own = (
        f"the run used FLoRIST with τ={basis.run_tau:g}"
        if basis.run_method == "florist"
        else f"the run used {basis.run_method}; rows show FLoRIST on the same update"
    )
    cap = f", federation.max_rank {basis.max_rank} applied" if basis.max_rank else ""
    return (
        f"{basis.path} round {basis.round_index}: FLoRIST over {basis.source} "
        f"({len(basis.weights)} aggregated clients), {len(basis.modules)} modules{cap}\n"
        f"{own} (logged total rank {logged_total})"
    )


def _plot(basis: FloristBasis, table, info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from florist_mpi.report import byte_unit

    scale, unit = byte_unit(max(float(table["down_bytes_total"].max()), info["logged_bytes_down"]))
    with plt.rc_context({"figure.dpi": 110, "savefig.bbox": "tight"}):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        tau = table["tau"].to_numpy()
        rank_line = ax.plot(tau, table["mean_rank"], marker="o", ms=3, color="tab:blue", label="mean global rank r_g")
        ax.set_xlabel("energy threshold τ")
        ax.set_ylabel("mean global rank r_g over modules", color="tab:blue")
        ax.tick_params(axis="y", labelcolor="tab:blue")
        ax.grid(True, alpha=0.3)
        twin = ax.twinx()
        down_line = twin.plot(
            tau,
            table["down_bytes_total"] / scale,
            marker="s",
            ms=3,
            ls="--",
            color="tab:orange",
            label=f"downlink per round, {basis.num_clients} clients",
        )
        twin.set_ylabel(f"downlink per round ({unit}, fp32)", color="tab:orange")
        twin.tick_params(axis="y", labelcolor="tab:orange")
        handles = rank_line + down_line
        logged = info["logged_bytes_down"] / scale
        label = f"logged downlink of round {basis.round_index} ({basis.run_method})"
        if basis.run_method == "florist":  # the run sent it at its τ
            handles += twin.plot([basis.run_tau], [logged], marker="*", ms=11, ls="none", color="tab:red", label=label)
        else:  # the method has no τ: a level to compare against
            handles.append(twin.axhline(logged, color="tab:red", ls="-.", lw=1, label=label))
        if basis.run_method == "florist" and tau.min() <= basis.run_tau <= tau.max():
            handles.append(ax.axvline(basis.run_tau, color="0.3", ls=":", lw=1.2, label=f"run's τ = {basis.run_tau:g}"))
        ax.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=8, loc="upper left")
        ax.set_title(f"{basis.path.stem}, round {basis.round_index}: FLoRIST rank and downlink vs τ")
        fig.savefig(path)
        plt.close(fig)
