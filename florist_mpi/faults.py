"""Fault injection for tests and failure studies (docs/fault-injection.md).

FLORIST_MPI_FAULT  = 'KIND@ROUND:CLIENT,...'  client faults: nan, raise, crash, exit
FLORIST_MPI_KILL_AT = 'POINT@ROUND'           rank 0 SIGKILLs itself at a point of a round:
                                              train, gather, aggregate, write (round written,
                                              not published), link (round file in place, not linked),
                                              clean (a replacing log published, the old files not yet deleted)
FLORIST_MPI_DIVERGE = 'ROUND:RANK'            that rank perturbs its base weights after the merge
"""
from __future__ import annotations

import os
import signal

FAULT_ENV = "FLORIST_MPI_FAULT"
KILL_ENV = "FLORIST_MPI_KILL_AT"
DIVERGE_ENV = "FLORIST_MPI_DIVERGE"
KILL_POINTS = ("train", "gather", "aggregate", "write", "link", "clean")


def client_fault(client_id: int, round_index: int) -> str | None:
    """The fault injected into this client in this round, if any."""
    for item in filter(None, (s.strip() for s in os.environ.get(FAULT_ENV, "").split(","))):
        kind, _, where = item.partition("@")
        round_text, _, client_text = where.partition(":")
        if round_text.isdigit() and client_text.isdigit():
            if int(round_text) == round_index and int(client_text) == client_id:
                return kind
    return None


def kill_point(point: str, round_index: int) -> None:
    """SIGKILL this process if FLORIST_MPI_KILL_AT names this point and round."""
    spec = os.environ.get(KILL_ENV, "")
    if not spec:
        return
    name, _, round_text = spec.partition("@")
    if name == point and round_text.isdigit() and int(round_text) == round_index:
        os.kill(os.getpid(), signal.SIGKILL)


def diverges(round_index: int, rank: int) -> bool:
    """Whether this rank should corrupt its merged weights (tests of the consistency check)."""
    round_text, _, rank_text = os.environ.get(DIVERGE_ENV, "").partition(":")
    return round_text.isdigit() and rank_text.isdigit() and (int(round_text), int(rank_text)) == (round_index, rank)
