"""`florist-mpi relink LOG`: point a log's round links at the round folder beside it.

florist_mpi always reads a log's rounds from the folder named after the log file
(`runs/b.h5` -> `runs/b.h5.rounds/`, docs/log-format.md), and every write re-points the
links there. A pair renamed or copied since its last write still holds links that name
the folder it was written with, which plain `h5py.File(log)["rounds/..."]` follows; this
command rewrites them (the log file only, atomically; the round files are not touched).
"""
from __future__ import annotations

from florist_mpi import storage


def add_arguments(parser) -> None:
    parser.add_argument("log", metavar="LOG", help="a run log (run.output) whose pair was renamed or copied")


def main(args) -> int:
    changed = storage.relink_log(args.log)
    folder = storage.rounds_folder(args.log)
    if changed:
        print(f"relinked {changed} rounds of '{args.log}' to '{folder}'")
    else:
        print(f"'{args.log}': every round link already names its own folder (or it is a single file): nothing to do")
    return 0
