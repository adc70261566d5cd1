"""The forms of `compare-methods` (florist_mpi.compare): its text table and its figures, both read
from the command's JSON document, so the three forms show the same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FLOP_UNITS = ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP"))
MARKERS = "osD^vP*Xh<>p"
ERROR_FLOOR = 1e-12  # relative errors below it are drawn at it on the log axis


def flop_unit(largest: float) -> tuple[float, str]:
    """(divisor, name) of the FLOP unit that shows `largest` with at most three integer digits or so."""
    for scale, name in FLOP_UNITS:
        if largest >= scale:
            return scale, name
    return 1.0, "FLOP"


def _applicable(document: dict) -> list[dict]:
    return [row for row in document["methods"] if row["note"] is None]


def _label(row: dict) -> str:
    return row["method"] if row["tau"] is None else f"{row['method']} τ={row['tau']:g}"


def _error(value) -> str:
    return "-" if value is None else f"{value:.3e}"


def _truncation(row: dict) -> str:
    """min/median/max of the clients' truncation errors, or '-' where the method sends no prefixes."""
    values = row["client_truncation_errors"]
    if not values:
        return "-"
    finite = [v for v in values.values() if v is not None]
    if not finite:
        return "-"
    return f"{min(finite):.2e}/{float(np.median(finite)):.2e}/{max(finite):.2e}"


def text_table(document: dict) -> str:
    """The table of the default output: one row per method and τ, one byte unit and one FLOP unit."""
    from florist_mpi.report import byte_unit, format_table

    rows = document["methods"]
    usable = _applicable(document)
    byte_scale, byte_name = byte_unit(max([max(r["bytes_down"], r["bytes_up"]) for r in usable], default=0))
    flop_scale, flop_name = flop_unit(max([r["server_flops"] for r in usable], default=0.0))
    with_eval = any(r["eval_loss"] is not None or r["eval_accuracy"] is not None for r in rows)
    accuracy = any(r["eval_accuracy"] is not None for r in rows)
    residual = any(r["residual_rank"] for r in usable)
    headers = ["method", "tau", "rel. error", "mean rank", "total rank"]
    headers += ["residual rank"] if residual else []
    headers += [f"down {byte_name}", f"up {byte_name}", f"server {flop_name}", "client trunc. err min/med/max"]
    headers += (["eval acc" if accuracy else "eval loss"] if with_eval else []) + ["note"]
    table = []
    for row in rows:
        if row["note"] is not None:
            cells = [row["method"], _tau(row), "-", "-", "-"] + (["-"] if residual else []) + ["-"] * 4
        else:
            cells = [row["method"], _tau(row), _error(row["relative_error"]), f"{row['mean_global_rank']:.2f}",
                     str(row["total_global_rank"])]
            cells += [str(sum(row["residual_rank"].values())) if row["residual_rank"] else "-"] if residual else []
            cells += [f"{row['bytes_down'] / byte_scale:.4g}", f"{row['bytes_up'] / byte_scale:.4g}",
                      f"{row['server_flops'] / flop_scale:.4g}", _truncation(row)]
        if with_eval:
            value = row["eval_accuracy"] if accuracy else row["eval_loss"]
            cells.append("-" if value is None else f"{value:.4f}")
        cells.append(_short_note(row["note"]))
        table.append(cells)
    clients = document["clients"]
    ranks = sorted({c["rank"] for c in clients})
    header = (
        f"{document['log']} round {document['round']}: every method on the same updates of {len(clients)} "
        f"aggregated clients (ranks {', '.join(map(str, ranks))}), {len(document['modules'])} modules; "
        f"the run used {document['run_method']}"
        + (f" (τ={document['run_tau']:g})" if document["run_method"] == "florist" else "")
        + (f", federation.max_rank {document['max_rank']} applied" if document["max_rank"] else "")
    )
    legend = [
        "rel. error: ‖G − ΔW‖_F / ‖ΔW‖_F over all modules, G the method's global update, ΔW = Σ p_k B_k A_k",
        f"down: to all {document['num_clients']} registered clients; up: from the aggregated ones (fp32 bytes)",
        "client trunc. err: ‖ΔW − B[:, :r_k] A[:r_k]‖_F / ‖ΔW‖_F of the prefix each client receives",
        f"logged round: down {document['logged_bytes_down'] / byte_scale:.4g} {byte_name}, "
        f"up {document['logged_bytes_up'] / byte_scale:.4g} {byte_name}",
    ]
    notes = [f"{row['method']}: {row['note']}" for row in rows if row["note"] is not None]
    return "\n".join([header, format_table(headers, table, left=2), *legend, *notes])


def _tau(row: dict) -> str:
    return "-" if row["tau"] is None else f"{row['tau']:g}"


def _short_note(note: str | None) -> str:
    return "" if note is None else "not applicable (see below)"


def write_plots(document: dict, folder: Path) -> list[Path]:
    """compare_methods.png (relative error versus downlink, one labelled point per row) and, when the
    rows were evaluated, compare_methods_eval.png (eval metric versus downlink); returns the files."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from florist_mpi.report import byte_unit

    rows = _applicable(document)
    scale, unit = byte_unit(max([r["bytes_down"] for r in rows], default=0))
    written = []
    accuracy = any(r["eval_accuracy"] is not None for r in rows)
    metric = "eval_accuracy" if accuracy else "eval_loss"
    figures = [("relative_error", "relative error ‖G − ΔW‖_F / ‖ΔW‖_F (log scale)", "compare_methods.png")]
    if any(r[metric] is not None for r in rows):
        label = "MMLU accuracy" if accuracy else "held-out loss (nats/token)"
        figures.append((metric, label, "compare_methods_eval.png"))
    with plt.rc_context({"figure.dpi": 110, "savefig.bbox": "tight"}):
        for key, ylabel, name in figures:
            points = [(r["bytes_down"] / scale, r[key], _label(r)) for r in rows if r[key] is not None]
            fig, ax = plt.subplots(figsize=(7.5, 4.5))
            for i, (x, y, label) in enumerate(points):
                y = max(y, ERROR_FLOOR) if key == "relative_error" else y
                # one legend entry per point (labels next to points overlap where methods send alike)
                ax.plot([x], [y], marker=MARKERS[i % len(MARKERS)], ms=7, ls="none", color=plt.cm.tab10(i % 10),
                        label=label)
            if key == "relative_error":
                ax.set_yscale("log")
            ax.set_xlabel(f"downlink per round ({unit}, fp32, {document['num_clients']} clients)")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
            ax.set_title(f"{Path(document['log']).stem}, round {document['round']}: every method on the same updates")
            path = Path(folder) / name
            fig.savefig(path)
            plt.close(fig)
            written.append(path)
    return written

