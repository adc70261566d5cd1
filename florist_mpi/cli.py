"""The `florist-mpi` command line.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`main(args) -> int`; this file only wires them up and turns user-facing errors
into one line on stderr with exit code 2 (`--debug` shows the traceback).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from florist_mpi import __version__
from florist_mpi.errors import USER_ERRORS, UserError

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "run": ("florist_mpi.runner", "run a federated experiment (under mpiexec/srun or on one process)"),
    "validate": ("florist_mpi.validate", "check a config (and its data paths) without running it"),
    "report": ("florist_mpi.report", "summarise one or more run logs, with optional plots"),
    "sweep-tau": ("florist_mpi.sweep", "recompute FLoRIST's global rank and size for many tau from a log"),
    "compare-methods": ("florist_mpi.compare", "re-aggregate one logged round with every method and compare them"),
    "export": ("florist_mpi.export", "write a round's cumulative global update as a PEFT LoRA adapter"),
    "pack": ("florist_mpi.pack", "copy a run log (file + round folder) into one self-contained HDF5 file"),
    "relink": ("florist_mpi.relink", "point a renamed or copied log's round links at the folder beside it"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="florist-mpi",
        description="MPI simulator for federated LoRA fine-tuning with FLoRIST aggregation.",
    )
    parser.add_argument("--version", action="version", version=f"florist-mpi {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        sub.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"florist-mpi: error: {UserError.one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("florist-mpi: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `florist-mpi report ... | head`: the reader left; end quietly, like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 141


if __name__ == "__main__":
    sys.exit(main())
