"""`florist-mpi pack LOG OUT.h5`: one self-contained HDF5 file from a run log.

A run writes its log as a file plus a folder of round files beside it
(`runs/demo.h5` + `runs/demo.h5.rounds/`, docs/log-format.md). The packed file holds the
same header and round groups with no links, so it can be shared or archived alone; every
command reads it, and `--resume` continues it (appending single-file style).
"""
from __future__ import annotations

from pathlib import Path

from florist_mpi import storage


def add_arguments(parser) -> None:
    parser.add_argument("log", metavar="LOG", help="a run log (run.output), either form")
    parser.add_argument("out", metavar="OUT.h5", help="the single file to write (must not exist)")


def main(args) -> int:
    out = Path(args.out)
    rounds = storage.pack_log(args.log, out)
    size = out.stat().st_size
    print(f"packed {rounds} rounds of '{args.log}' into '{out}' ({size / 1e6:.1f} MB, one file)")
    return 0
