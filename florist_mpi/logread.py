"""Reading a run log, either form (docs/log-format.md).

`open_log` yields the log file itself for a single-file log (format 1, or packed) and a
`SplitLog` for a log file + round folder: its attributes are the log file's, and every round
group is opened from the round folder derived from the log file's own path
(`runs/demo.h5` -> `runs/demo.h5.rounds/`), whatever folder name its links were written with.
So a pair that was copied or renamed as a whole reads as itself and never as the original
(florist_mpi/logfiles.py). Both give `log["rounds"][key]`, `log["rounds/00003/global/..."]`
and `log.attrs`; the functions below read either.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import h5py
import numpy as np

from florist_mpi import logfiles
from florist_mpi.logfiles import FORMAT_VERSION, ROUNDS_SUFFIX, LogError, round_key, rounds_folder


class RoundsView(Mapping):
    """`/rounds` of a split log: round key -> the root group of its round file, opened from the log's
    own round folder (the links' folder part, the name they were written under, is not used)."""

    def __init__(self, links: h5py.Group, folder: Path):
        self.links, self.folder = links, folder

    def __getitem__(self, key: str) -> h5py.Group:
        link = self.links.get(key, getlink=True)
        if link is None:
            raise KeyError(f"no round '{key}' in the log")
        if not isinstance(link, h5py.ExternalLink):
            return self.links[key]
        # the group keeps its file open; the file closes when the group is dropped
        return h5py.File(self.folder / PurePosixPath(link.filename).name, "r")[link.path]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.links

    def __iter__(self) -> Iterator[str]:
        return iter(self.links.keys())

    def __len__(self) -> int:
        return len(self.links)


class SplitLog:
    """A split log open for reading (what `open_log` yields for one): the log file's attributes, and
    `log["rounds"]`, `log["rounds/00003"]`, `log["rounds/00003/global/..."]` read from the round folder
    beside the log file, named after the log file's own name."""

    def __init__(self, index: h5py.File, folder: Path):
        self.index, self.folder = index, folder
        self.attrs = index.attrs
        self.filename = index.filename

    def __getitem__(self, name: str):
        head, _, rest = name.strip("/").partition("/")
        if head != "rounds":
            return self.index[name]
        rounds = RoundsView(self.index["rounds"], self.folder)
        if not rest:
            return rounds
        key, _, below = rest.partition("/")
        return rounds[key][below] if below else rounds[key]

    def __contains__(self, name: str) -> bool:
        try:
            self[name]
        except (KeyError, OSError):
            return False
        return True

    def keys(self):
        return self.index.keys()


LogHandle = h5py.File | SplitLog  # what open_log yields: a single-file log is read as it is


@contextmanager
def open_log(path: str | Path, verify: bool = False, check_files: bool = True) -> Iterator[LogHandle]:
    """Open a log read-only (either form), turning anything that is not one into a LogError.

    A split log is read through the round folder derived from `path` (SplitLog). Checks that
    every linked round file exists there (~50 us a round; `check_files=False` skips it, for the
    writer, which reads no round); `verify` also opens each one (catches truncated copies;
    ~0.3 ms a round).
    """
    path = Path(path)
    if not path.is_file():
        raise LogError(_missing_message(path))
    try:
        handle = h5py.File(path, "r")
    except OSError:
        raise LogError(f"'{path}' is not a readable HDF5 file (truncated or not a log): check the path") from None
    try:
        version = handle.attrs.get("format_version")
        if version is None or "rounds" not in handle or "config" not in handle.attrs:
            raise LogError(f"'{path}' is an HDF5 file but not a florist_mpi run log: check the path")
        if int(version) > FORMAT_VERSION:
            raise LogError(
                f"log '{path}' has format_version {int(version)}, newer than this florist_mpi "
                f"understands ({FORMAT_VERSION}): upgrade florist_mpi"
            )
        split = "run_id" in handle.attrs or "rounds_dir" in handle.attrs
        if split and check_files:
            _check_round_files(handle, path, verify)
        yield SplitLog(handle, rounds_folder(path)) if split else handle
    finally:
        handle.close()


def _missing_message(path: Path) -> str:
    if path.is_dir():
        if path.name.endswith(ROUNDS_SUFFIX):
            return (f"'{path}' is the round folder of log '{path.name.removesuffix(ROUNDS_SUFFIX)}': "
                    "give the path of the log file (run.output)")
        return f"'{path}' is a directory, not a run log: give the path of a run's .h5 file (run.output)"
    if rounds_folder(path).is_dir():
        return (f"log '{path}' not found, but its round folder '{rounds_folder(path)}' is there "
                "(was the log file moved or renamed?): keep the two together")
    return f"log '{path}' not found: give the path of a run's .h5 log (run.output)"


def _check_round_files(handle: h5py.File, path: Path, verify: bool) -> None:
    """One-line LogError if the log's round folder or a linked round file in it is missing (or, with
    `verify`, unreadable)."""
    folder = rounds_folder(path)
    rounds = handle["rounds"]
    if not folder.is_dir():
        raise LogError(logfiles.missing_folder_message(path, linked_round_files(rounds)))
    for key in rounds.keys():
        link = rounds.get(key, getlink=True)
        if not isinstance(link, h5py.ExternalLink):
            continue
        target = folder / PurePosixPath(link.filename).name
        problem = None
        if not target.is_file():
            problem = "is missing"
        elif verify:
            try:
                h5py.File(target, "r").close()
            except OSError:
                problem = "is truncated or damaged"
        if problem:
            raise LogError(
                f"log '{path}': the file of round {int(key)}, '{target}', {problem} (folder copied only in part?): "
                f"copy the whole folder '{folder.name}' again, or use an intact copy of the log"
            )


def linked_round_files(rounds: h5py.Group) -> set[str]:
    """The names of the round files a log file's `/rounds` links to (without their folder part)."""
    links = [rounds.get(key, getlink=True) for key in rounds.keys()]
    return {PurePosixPath(link.filename).name for link in links if isinstance(link, h5py.ExternalLink)}


def is_split(handle: LogHandle) -> bool:
    """True for a log file + round folder log, False for a single-file (format 1 or packed) one."""
    return isinstance(handle, SplitLog)


def completed_rounds(handle: LogHandle) -> list[int]:
    return sorted(int(key) for key in handle["rounds"].keys())


def round_is_empty(handle: LogHandle, round_index: int) -> bool:
    """True for a round that aggregated no client (federation.empty_round: skip): its global
    factors are rank 0 and the global model did not change. Logs from before the attribute
    `clients_aggregated` existed hold no such round."""
    attrs = handle["rounds"][round_key(round_index)].attrs
    return int(attrs.get("clients_aggregated", 1)) == 0


def read_global_factors(handle: LogHandle, round_index: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    group = handle["rounds"][round_key(round_index)]["global"]
    return {module: (group[module]["B"][()], group[module]["A"][()]) for module in group.keys()}


def read_residual_factors(handle: LogHandle, round_index: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module -> (residual_B m×q, residual_A q×n) merged into the base that round (FedEx-LoRA); {} for
    a round (or a method) without one."""
    group = handle["rounds"][round_key(round_index)]["global"]
    return {module: (group[module]["residual_B"][()], group[module]["residual_A"][()])
            for module in group.keys() if "residual_B" in group[module]}


def read_modules(handle: LogHandle) -> list[str]:
    return [m.decode() if isinstance(m, bytes) else str(m) for m in handle.attrs["modules"]]


def decode_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
