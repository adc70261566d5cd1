"""The `florist-mpi report` command: its options, and which of the package's forms it prints."""
from __future__ import annotations

import json
import math
import sys

from florist_mpi.analysis import open_run
from florist_mpi.errors import UserError
from florist_mpi.report.documents import per_round_rows, report_document
from florist_mpi.report.formatting import plots_dir, run_labels
from florist_mpi.report.plots import write_plots
from florist_mpi.report.scaling import scaling_study
from florist_mpi.report.scaling_forms import scaling_document, scaling_rows, scaling_text
from florist_mpi.report.scaling_plots import write_scaling_plots
from florist_mpi.report.summary import text_report


def add_arguments(parser) -> None:
    parser.add_argument("logs", nargs="+", metavar="RUN.h5", help="run logs (run.output of each run)")
    machine = parser.add_mutually_exclusive_group()
    machine.add_argument("--csv", action="store_true", help="print one CSV row per run and round instead of text")
    machine.add_argument(
        "--json",
        action="store_true",
        help="print a JSON document per run (config, summary, totals, rounds, global ranks) instead of text",
    )
    parser.add_argument("--plots", metavar="DIR", help="also write PNG figures into DIR (created if missing)")
    parser.add_argument("--verbose", action="store_true", help="show the per-module global rank table for every run")
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="report the logs as one scaling study (runs differing only in MPI ranks, number of clients, output path "
        "and repeat): speed-up, efficiency, load imbalance, memory, phase shares and traffic per round",
    )
    parser.add_argument(
        "--skip-first-round",
        action="store_true",
        help="with --scaling: leave each log's first round out of the figures (warm-up: engines built, caches filled)",
    )
    parser.add_argument(
        "--target-loss",
        type=float,
        metavar="LOSS",
        help="eval loss of the simulated time-to-target table (runs with a system section; "
        "default: the lowest loss every such run reaches)",
    )


def main(args) -> int:
    scaling = getattr(args, "scaling", False)
    target_loss = getattr(args, "target_loss", None)
    if getattr(args, "skip_first_round", False) and not scaling:
        raise UserError("--skip-first-round applies to a scaling study only: add --scaling, or drop it")
    if scaling and target_loss is not None:
        raise UserError("--target-loss has no meaning with --scaling: drop one of them")
    if target_loss is not None and not (math.isfinite(target_loss) and target_loss > 0):
        raise UserError(f"--target-loss {target_loss:g} is not a positive loss: give e.g. --target-loss 2.5")
    runs = [open_run(path) for path in args.logs]  # every log is checked before anything is printed
    labels = run_labels([run.path for run in runs])
    if scaling:
        return scaling_main(runs, labels, args)
    machine = args.csv or args.json
    if args.plots:
        plot_dir = plots_dir(args.plots)
    if args.csv:
        per_round_rows(runs, labels).to_csv(sys.stdout, index=False, float_format="%.10g")
    elif args.json:
        json.dump(report_document(runs, labels, target_loss), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(text_report(runs, labels, verbose=args.verbose, target_loss=target_loss))
    if args.plots:
        written = write_plots(runs, labels, plot_dir)
        note = sys.stderr if machine else sys.stdout
        print(f"wrote {len(written)} plots to {plot_dir}/: " + ", ".join(p.name for p in written), file=note)
    return 0


def scaling_main(runs: list, labels: list[str], args) -> int:
    """`report --scaling`: the study's text, CSV or JSON on stdout, and its figures with --plots."""
    study = scaling_study(runs, labels, skip_first_round=args.skip_first_round)  # refuses a mixed set first
    plot_dir = plots_dir(args.plots) if args.plots else None
    if args.csv:
        scaling_rows(study).to_csv(sys.stdout, index=False, float_format="%.10g")
    elif args.json:
        json.dump(scaling_document(study), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(scaling_text(study))
    if plot_dir is not None:
        written = write_scaling_plots(study, plot_dir)
        note = sys.stderr if args.csv or args.json else sys.stdout
        print(f"wrote {len(written)} plots to {plot_dir}/: " + ", ".join(p.name for p in written), file=note)
    return 0
