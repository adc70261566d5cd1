"""User-facing errors: each carries a one-line message naming the problem and the fix."""
from __future__ import annotations

from florist_mpi.config import ConfigError
from florist_mpi.storage import LogError


class UserError(ValueError):
    """A problem with the user's input (flags, files, paths) rather than a bug."""

    @staticmethod
    def one_line(err: BaseException) -> str:
        return " ".join(str(err).split())


def _data_error():
    try:
        from florist_mpi.data import DataError
    except ImportError:  # data module not importable: nothing to add
        return ()
    return (DataError,)


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ConfigError, LogError, *_data_error())


class SharedFailure(RuntimeError):
    """A failure every rank learned from rank 0's verdict: only rank 0 reports it."""


class RoundFailed(SharedFailure):
    """A round that cannot be completed: every client was excluded, under federation.empty_round: fail."""


class RanksDiverged(SharedFailure):
    """The ranks' base weights differ after a merge: the simulation is no longer sound."""
