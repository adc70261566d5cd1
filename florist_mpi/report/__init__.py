"""`florist-mpi report`: summarise run logs as text, CSV or JSON, with optional PNG plots.

    florist-mpi report runs/demo.h5 --plots runs/plots
    florist-mpi report runs/*.h5 --csv > summary.csv
    florist-mpi report --scaling runs/scaling/*.h5 --plots runs/scaling/plots

Text (default): per run the config essentials, a per-round table (eval loss, eval accuracy
when the run measured it, clients, global rank min/mean/max, bytes, time), totals and
phase times; the per-module rank table for runs with few modules or with --verbose; with
several runs a comparison table (world size, clients, loss, accuracy, traffic, rank, time).
--csv prints one row per run and round; --json prints one complete document per run
(config, summary, totals, per-round rows with each module's global rank). Both go to
stdout alone, so they can be redirected to a file; messages about plots then go to
stderr. Columns and fields: docs/analysis.md.

--scaling reports the logs as one scaling study instead (speed-up, efficiency, load imbalance,
memory, phase shares, traffic; text, --csv, --json, --plots): see scaling.

One module per role:
    command      the command's options and which form it prints
    summary      the text report (per-run blocks)
    comparison   the comparison table over several runs
    target       the simulated time-to-target table
    scaling      `--scaling`: which logs form a study, and its numbers (speed-up, efficiency, ...)
    scaling_forms  the study as text, CSV rows and a JSON document
    scaling_plots  the study's PNG figures
    documents    per-round CSV rows and JSON documents
    plots        the PNG figures
    stats        the numbers derived from one run (run_summary, has_clock, ...)
    formatting   labels, number and byte formats, aligned tables (also used by sweep-tau)
"""
from florist_mpi.report.command import add_arguments, main
from florist_mpi.report.documents import per_round_rows, report_document, run_document
from florist_mpi.report.formatting import byte_unit, format_table, run_labels, short_module_names
from florist_mpi.report.plots import write_plots
from florist_mpi.report.stats import run_summary
from florist_mpi.report.summary import text_report
from florist_mpi.report.target import time_to_target

__all__ = [
    "add_arguments",
    "byte_unit",
    "format_table",
    "main",
    "per_round_rows",
    "report_document",
    "run_document",
    "run_labels",
    "run_summary",
    "short_module_names",
    "text_report",
    "time_to_target",
    "write_plots",
]
