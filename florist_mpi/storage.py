"""The HDF5 run log: writing rounds crash-safely and reading them back.

Layout (docs/log-format.md, format_version 2): a run's log is an index file, `run.output`
(e.g. `runs/demo.h5`), plus a folder beside it named after it with `.rounds` appended
(`runs/demo.h5.rounds/`) that holds one HDF5 file per completed round. The index keeps the
header and links each round's group `/rounds/<r>` to its round file with an HDF5 external
link, so `h5py.File(log)["rounds/00003/global/..."]` reads through to the round file.
`pack_log` turns a log into one self-contained file (round groups copied in, no links);
logs of format_version 1 are such single files too. Every reader here handles both forms.

Ownership (florist_mpi/logfiles.py): the round folder is always the one derived from the log
file's own path, never a name stored inside it, and a log writes and deletes only its own files
there. Readers open round files from that folder (`SplitLog`), so a pair copied or renamed as a
whole reads as itself; every write re-points the links at it (`relink_log` does only that).

Crash safety (docs/crash-safety.md): nothing visible is ever opened for writing.

- A round is written to `<folder>/<r>-<run id>.h5.tmp`, fsynced and renamed to
  `<r>-<run id>.h5`; then the index is copied to `<log>.tmp` (it is small: header and
  links), the round's link is added, and the copy is fsynced and renamed over the index.
  The index rename is the commit: a round is visible only once it is linked, and a
  round file that is not linked (a kill between the two renames) is never read; the
  next write of the log deletes it.
- A new log writes its header with round 0 under a new run id, claimed in the folder
  (`<run id>.pending`) before any of its files exist; `replace` swaps an old log out only at
  the index rename (the new run's files carry the new run id, so they never touch the old
  run's), and the old run's round files and the claim are deleted after that. Files of a claim
  that never got published are deleted by the next write at that path.
- Single-file logs (format 1, or packed) are appended as before: the whole file is
  copied beside itself, the round written into the copy, which is fsynced and renamed over.

Streaming client adapters: rank 0 never needs every client's factors at once to log them.
`RoundRecord.client_adapters` may be

- a dict `{client_id: {module: (B, A)}}` (everything in memory), or
- an iterable yielding `(module, {client_id: (B, A)})`, one module at a time; the writer
  writes each module's factors as soon as it is yielded and keeps no reference to them,
  so a generator that receives one module from another rank per step (and drops it after
  yielding) bounds rank 0's memory to one module's client factors.

For writers that get client factors before the round's global factors are known,
`begin_round(path, index, ...)` returns a `RoundWriter`: call
`writer.write_client_module(module, {client_id: (B, A)})` once per module, as the factors
arrive (any order; a client's module at most once), then `writer.commit(record)` with
`record.client_adapters=None`; leaving the `with` block without commit discards the round.
B is m x r_k and A is r_k x n (effective factors, LoRA scaling folded in), stored float32.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import h5py
import numpy as np

from florist_mpi import logfiles
from florist_mpi.logfiles import FORMAT_VERSION, ROUND_DIGITS, ROUNDS_SUFFIX, LogError, round_key, rounds_folder
from florist_mpi.logread import (
    LogHandle,
    SplitLog,
    completed_rounds,
    decode_str,
    is_split,
    linked_round_files,
    open_log,
    read_global_factors,
    read_modules,
    read_residual_factors,
    round_is_empty,
)

__all__ = [  # the log's public API (with the names it takes from logfiles and logread)
    "FORMAT_VERSION", "ROUND_DIGITS", "ROUNDS_SUFFIX", "LogError", "LogHandle", "RoundRecord", "RoundWriter",
    "RunHeader", "SplitLog", "append_round", "begin_round", "check_new_log", "completed_rounds", "create_log",
    "decode_str", "is_split", "legacy_create_log", "open_log", "pack_log", "read_global_factors", "read_modules",
    "read_residual_factors",
    "relink_log", "round_is_empty", "round_key", "rounds_folder", "RANK_COLUMNS",
]


# The ranks/ group of a round: one dataset per figure, one value per MPI rank (docs/log-format.md).
RANK_COLUMNS = ("time_train", "time_wait", "clients", "peak_rss_bytes", "mpi_bytes_sent", "mpi_bytes_received",
                "peak_gpu_bytes")
Factors = tuple[np.ndarray, np.ndarray]  # (B m x r, A r x n)
ClientModule = Mapping[int, Factors]  # one module's factors of every logged client: client id -> (B, A)
ClientAdapters = Mapping[int, Mapping[str, Factors]] | Iterable[tuple[str, ClientModule]]
Hook = Callable[[], None] | None
Finish = Callable[[h5py.AttributeManager], None] | None  # sets a round's last attributes (RoundWriter.commit)


@dataclass
class RoundRecord:
    """Everything one completed round adds to the log.

    `client_adapters`: None, a dict client id -> module -> (B, A), or an iterable of
    (module, {client id: (B, A)}) consumed one module at a time (see the module docstring).
    """

    index: int
    attrs: dict
    clients: dict[str, np.ndarray]
    excluded: list[tuple[int, str]]
    # module -> (B, A, singular_values, rank, energy)
    global_factors: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int, float]]
    client_adapters: ClientAdapters | None = None
    ranks: dict[str, np.ndarray] | None = None  # ranks/<column>: one value per MPI rank
    # module -> (m×q, q×n) residual merged into the base (FedEx-LoRA): global/<module>/residual_{B,A}
    residuals: dict[str, tuple[np.ndarray, np.ndarray]] | None = None


@dataclass
class RunHeader:
    config_yaml: str
    method: str
    tau: float
    num_clients: int
    world_size: int
    created: str
    versions: dict
    modules: list[str]
    module_shapes: list[tuple[int, int]]
    initial_eval_loss: float = float("nan")
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------- atomic replace


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_file(source: Path, target: Path) -> None:
    """Copy a file; copy_file_range lets file systems that can share extents (XFS, btrfs)
    or copy server-side (NFS 4.2) do so."""
    size = source.stat().st_size
    copied = 0
    try:
        with open(source, "rb") as src, open(target, "wb") as dst:
            while copied < size:
                step = os.copy_file_range(src.fileno(), dst.fileno(), size - copied)
                if step == 0:
                    break
                copied += step
    except (OSError, AttributeError):  # not offered here (old kernel, other platform)
        copied = -1
    if copied != size:
        shutil.copyfile(source, target)


def _shadow_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


class _Shadow:
    """An HDF5 file written under `<path>.tmp` and published over `path` by an atomic rename."""

    def __init__(self, path: Path, start_from_existing: bool):
        self.path, self.temp = path, _shadow_path(path)
        if self.temp.exists():
            self.temp.unlink()  # left by a writer killed mid-write; `path` itself is intact
        if start_from_existing:
            _copy_file(path, self.temp)
        self.handle = h5py.File(self.temp, "a" if start_from_existing else "w-")

    def publish(self, before_rename: Hook = None) -> None:
        self.handle.close()
        _fsync_file(self.temp)
        if before_rename is not None:
            before_rename()
        os.replace(self.temp, self.path)
        logfiles.fsync_dir(self.path.parent)

    def discard(self) -> None:
        try:
            self.handle.close()
        finally:
            self.temp.unlink(missing_ok=True)


@contextmanager
def _atomic_update(path: Path, start_from_existing: bool):
    """Yield an open h5py.File on a shadow copy; publish it atomically on success."""
    shadow = _Shadow(path, start_from_existing)
    try:
        yield shadow.handle
        shadow.publish()
    except BaseException:
        shadow.discard()
        raise


# ------------------------------------------------------------------------ writing


def _write_header(handle: h5py.File, header: RunHeader, format_version: int = FORMAT_VERSION) -> None:
    attrs = handle.attrs
    attrs["format_version"] = format_version
    attrs["config"] = header.config_yaml
    attrs["method"] = header.method
    attrs["tau"] = float(header.tau)
    attrs["num_clients"] = int(header.num_clients)
    attrs["world_size"] = int(header.world_size)
    attrs["created"] = header.created
    attrs["versions"] = json.dumps(header.versions, sort_keys=True)
    attrs["modules"] = np.array(header.modules, dtype=h5py.string_dtype())
    attrs["module_shapes"] = np.asarray(header.module_shapes, dtype=np.int64).reshape(-1, 2)
    attrs["initial_eval_loss"] = float(header.initial_eval_loss)
    for key, value in header.extra.items():
        attrs[key] = value


def _write_round(group: h5py.Group, record: RoundRecord) -> None:
    """Attributes, clients/ and global/ of a round (client adapters: _write_client_module)."""
    for key, value in record.attrs.items():
        group.attrs[key] = value
    clients = group.create_group("clients")
    for key, values in record.clients.items():
        clients.create_dataset(key, data=np.asarray(values))
    clients.create_dataset("excluded", data=np.array([cid for cid, _ in record.excluded], dtype=np.int64))
    clients.create_dataset(
        "excluded_reason", data=np.array([why for _, why in record.excluded], dtype=h5py.string_dtype())
    )
    if record.ranks is not None:
        ranks = group.create_group("ranks")
        for key, values in record.ranks.items():
            ranks.create_dataset(key, data=np.asarray(values))
    global_group = group.create_group("global")
    for module, (B, A, sv, rank, energy) in record.global_factors.items():
        node = global_group.create_group(module)
        node.create_dataset("B", data=np.ascontiguousarray(B, dtype=np.float32))
        node.create_dataset("A", data=np.ascontiguousarray(A, dtype=np.float32))
        node.create_dataset("singular_values", data=np.asarray(sv, dtype=np.float64))
        node.attrs["rank"] = int(rank)
        node.attrs["energy"] = float(energy)
        if record.residuals and module in record.residuals:
            left, right = record.residuals[module]
            node.create_dataset("residual_B", data=np.ascontiguousarray(left, dtype=np.float32))
            node.create_dataset("residual_A", data=np.ascontiguousarray(right, dtype=np.float32))


def _write_client_module(group: h5py.Group, module: str, factors: ClientModule) -> None:
    """`client_adapters/<client id>/<module>/{B,A}` for one module of every client given."""
    adapters = group.require_group("client_adapters")
    for cid, (B, A) in factors.items():
        node = adapters.require_group(str(int(cid))).create_group(module)
        node.create_dataset("B", data=np.ascontiguousarray(B, dtype=np.float32))
        node.create_dataset("A", data=np.ascontiguousarray(A, dtype=np.float32))


def _client_modules(adapters: ClientAdapters) -> Iterable[tuple[str, ClientModule]]:
    """(module, {client: (B, A)}) steps from either form of RoundRecord.client_adapters."""
    if isinstance(adapters, Mapping):  # client id -> module -> (B, A): one client at a time
        for cid, modules in sorted(adapters.items()):
            for module, factors in modules.items():
                yield module, {cid: factors}
    else:
        yield from adapters


def _new_run_id() -> str:
    """Names a log's round files so that a replacing run never writes over the old run's files."""
    return secrets.token_hex(4)


@dataclass
class _SplitIdentity:
    """What a split log's file says about its round files."""

    run_id: str
    linked: set[str]  # names of the round files its links point to (the folder part is ignored)


def _split_identity(path: Path) -> _SplitIdentity | None:
    """The identity of the split log at `path`, or None (absent, single-file, not a log)."""
    try:
        with h5py.File(path, "r") as handle:
            run_id = handle.attrs.get("run_id")
            if run_id is None or "rounds" not in handle:
                return None
            return _SplitIdentity(decode_str(run_id), linked_round_files(handle["rounds"]))
    except (OSError, KeyError):
        return None


def _stale_links(rounds: h5py.Group, folder_name: str) -> dict[str, h5py.ExternalLink]:
    """Round links that do not point into `folder_name`, each with the link it should be."""
    stale = {}
    for key in rounds.keys():
        link = rounds.get(key, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            wanted = f"{folder_name}/{PurePosixPath(link.filename).name}"
            if link.filename != wanted:
                stale[key] = h5py.ExternalLink(wanted, link.path)
    return stale


def _relink(rounds: h5py.Group, folder_name: str) -> int:
    """Point every round link at `folder_name/<its round file>` (after the pair was renamed or copied)."""
    stale = _stale_links(rounds, folder_name)
    for key, link in stale.items():
        del rounds[key]
        rounds[key] = link
    return len(stale)


def _creating(path: Path, replace: bool) -> str:
    return f"the run replacing log '{path}'" if replace and path.exists() else f"a new log '{path}'"


def check_new_log(path: str | Path, replace: bool) -> None:
    """Refuse up front a new log at `path` (or, with `replace`, a replacement of the log there) that
    could not be written without touching another log's round files (see florist_mpi/logfiles.py)."""
    path = Path(path)
    old = _split_identity(path) if replace else None
    logfiles.check_creatable(path, old.run_id if old else None, _creating(path, replace))


class RoundWriter:
    """One round being written; nothing of it is visible until `commit`.

    Obtain with `begin_round`. Between that and `commit`, call `write_client_module` for
    each module whose client factors arrive (streaming; see the module docstring).
    Every file it writes or deletes is in the round folder derived from `path` and is owned by
    the log there (florist_mpi/logfiles.py), whatever folder name the log file stores.
    """

    def __init__(self, path: Path, index: int, header: RunHeader | None, replace: bool):
        self.path, self.index, self.header, self.replace = path, index, header, replace
        self.folder = rounds_folder(path)
        self._done = False
        self.replaced: str | None = None  # the run id of the log a new log replaces
        self.made_folder = False
        if header is not None:
            self._start_new_log()
        else:
            self._start_append()

    # ------------------------------------------------------------------ opening

    def _start_new_log(self) -> None:
        path, folder = self.path, self.folder
        if path.exists() and not self.replace:
            raise LogError(
                f"log '{path}' already exists: pass --resume to continue it, --overwrite to replace it, "
                "or choose another run.output"
            )
        old = _split_identity(path) if path.exists() else None
        self.replaced = old.run_id if old else None
        logfiles.check_creatable(path, self.replaced, _creating(path, self.replace))
        path.parent.mkdir(parents=True, exist_ok=True)
        self.made_folder = not folder.exists()
        folder.mkdir(exist_ok=True)
        logfiles.settle(folder, self.replaced, old.linked if old else set())  # earlier interrupted writers
        self.run_id = _new_run_id()
        logfiles.claim(folder, self.run_id, self.replaced)  # before any file of the new run id exists
        self.split = True
        self._open_round_file()

    def _start_append(self) -> None:
        path = self.path
        with open_log(path, check_files=False) as handle:
            if round_key(self.index) in handle["rounds"]:
                raise LogError(f"log '{path}' already holds round {self.index}")
        identity = _split_identity(path)
        self.split = identity is not None
        if self.split:
            if not self.folder.is_dir():
                raise LogError(logfiles.missing_folder_message(path, identity.linked))
            self.run_id = identity.run_id
            logfiles.settle(self.folder, self.run_id, identity.linked)  # orphans of killed writers of this log
            self._open_round_file()
        else:  # single file (format 1 or packed): the round goes into a copy of the whole file
            self.shadow = _Shadow(path, start_from_existing=True)
            self.group = self.shadow.handle.require_group("rounds").create_group(round_key(self.index))

    def _open_round_file(self) -> None:
        self.round_name = logfiles.round_file_name(self.index, self.run_id)
        self.round_path = self.folder / self.round_name
        self.round_temp = _shadow_path(self.round_path)
        self.round_temp.unlink(missing_ok=True)
        self.round_handle = h5py.File(self.round_temp, "w")
        self.group = self.round_handle["/"]

    # ------------------------------------------------------------------ writing

    def write_client_module(self, module: str, factors: ClientModule) -> None:
        """Write one module's factors of the given clients (client id -> (B m x r_k, A r_k x n))."""
        _write_client_module(self.group, module, factors)

    def commit(self, record: RoundRecord, *, root_attrs: dict | None = None, before_publish: Hook = None,
               before_link: Hook = None, before_cleanup: Hook = None, finish: Finish = None) -> None:
        """Write the rest of the round and make it visible atomically.

        `finish(attrs)`, when given, is called with the round's attributes once everything else of the
        round is written, just before its file is closed and published: the last attributes (the
        round's own write time, `time_log`) are set there.

        Test hooks: `before_publish` is called with the round written and flushed, nothing published;
        `before_link` (split logs) with the round file in place, not yet linked; `before_cleanup`
        (a new split log) with the log file published, the replaced run's files and the claim not
        yet deleted.
        """
        if record.index != self.index:
            raise ValueError(f"record of round {record.index} committed to the writer of round {self.index}")
        _write_round(self.group, record)
        if record.client_adapters is not None:
            for module, factors in _client_modules(record.client_adapters):
                self.write_client_module(module, factors)
                del factors  # let this module's factors go before the next module is produced
        if finish is not None:
            finish(self.group.attrs)
        if self.split:
            self._commit_split(root_attrs, before_publish, before_link, before_cleanup)
        else:
            for key, value in (root_attrs or {}).items():
                self.shadow.handle.attrs[key] = value
            self.shadow.publish(before_rename=before_publish)
            self._done = True

    def _commit_split(self, root_attrs: dict | None, before_publish: Hook, before_link: Hook,
                      before_cleanup: Hook) -> None:
        self.round_handle.close()
        _fsync_file(self.round_temp)
        if before_publish is not None:
            before_publish()
        os.replace(self.round_temp, self.round_path)  # in place, but not visible until linked
        logfiles.fsync_dir(self.folder)
        if before_link is not None:
            before_link()
        with _atomic_update(self.path, start_from_existing=self.header is None) as index:
            if self.header is not None:
                _write_header(index, self.header)
                index.attrs["run_id"] = self.run_id
            index.attrs["rounds_dir"] = self.folder.name
            for key, value in (root_attrs or {}).items():
                index.attrs[key] = value
            rounds = index.require_group("rounds")
            _relink(rounds, self.folder.name)  # earlier rounds of a pair renamed or copied since its last write
            rounds[round_key(self.index)] = h5py.ExternalLink(f"{self.folder.name}/{self.round_name}", "/")
        self._done = True  # published: from here on nothing of it may be discarded
        if self.header is not None:
            if before_cleanup is not None:
                before_cleanup()
            logfiles.release(self.folder, self.run_id, self.replaced)  # the replaced run's files, then the claim

    def discard(self) -> None:
        """Undo an unpublished round (an error, not a kill): delete what this writer wrote."""
        if self._done:
            return
        self._done = True
        if not self.split:
            self.shadow.discard()
            return
        try:
            self.round_handle.close()
        finally:
            self.round_temp.unlink(missing_ok=True)
            self.round_path.unlink(missing_ok=True)  # renamed into the folder but never linked
            if self.header is not None:
                logfiles.abandon(self.folder, self.run_id)
                if self.made_folder:
                    try:
                        self.folder.rmdir()  # a new log's folder that holds nothing: leave no trace
                    except OSError:
                        pass

    def __enter__(self) -> "RoundWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()  # a no-op after commit


def begin_round(path: str | Path, index: int, *, header: RunHeader | None = None,
                replace: bool = False) -> RoundWriter:
    """Start writing round `index`: of a new log when `header` is given (its first round), else
    appended to the log at `path`. Use as a context manager; see RoundWriter."""
    return RoundWriter(Path(path), index, header, replace)


def create_log(
    path: str | Path, header: RunHeader, *, replace: bool = False, first_round: RoundRecord,
    before_publish: Hook = None, before_link: Hook = None, before_cleanup: Hook = None, finish: Finish = None,
) -> None:
    """Create a log with its first round in one atomic step.

    An existing file is refused unless `replace`; even then it is swapped out only
    once the new log is complete on disk, so a failed run never costs the old one.
    """
    with begin_round(path, first_round.index, header=header, replace=replace) as writer:
        writer.commit(first_round, before_publish=before_publish, before_link=before_link,
                      before_cleanup=before_cleanup, finish=finish)


def append_round(path: str | Path, record: RoundRecord, before_publish: Hook = None,
                 root_attrs: dict | None = None, before_link: Hook = None, finish: Finish = None) -> None:
    """Add one completed round (and update root attributes); it becomes visible atomically."""
    with begin_round(path, record.index) as writer:
        writer.commit(record, root_attrs=root_attrs, before_publish=before_publish, before_link=before_link,
                      finish=finish)


def legacy_create_log(path: str | Path, header: RunHeader, first_round: RoundRecord,
                      format_version: int = 1) -> None:
    """A single-file log as format_version 1 wrote it (header and rounds in one file).

    `append_round` then appends to it the format-1 way (copy the whole file per round).
    Kept for format-1 tests and for the old-vs-new comparison in benchmarks/log_write.py.
    """
    path = Path(path)
    if path.exists():
        raise LogError(f"log '{path}' already exists")
    with _atomic_update(path, start_from_existing=False) as handle:
        _write_header(handle, header, format_version)
        group = handle.create_group("rounds").create_group(round_key(first_round.index))
        _write_round(group, first_round)
        for module, factors in _client_modules(first_round.client_adapters or {}):
            _write_client_module(group, module, factors)


def relink_log(path: str | Path) -> int:
    """Point a split log's links at the round folder beside it (after the pair was renamed or copied),
    so that plain h5py reads them too; returns the number of links rewritten (0: nothing to do).

    Every florist_mpi reader, and every write, already uses that folder; this is for other readers.
    """
    path = Path(path)
    folder_name = rounds_folder(path).name
    with open_log(path) as handle:  # every linked round file must be there under the folder's new name
        if not is_split(handle) or not _stale_links(handle.index["rounds"], folder_name):
            return 0
    with _atomic_update(path, start_from_existing=True) as index:
        index.attrs["rounds_dir"] = folder_name
        changed = _relink(index["rounds"], folder_name)
    return changed


def pack_log(source: str | Path, target: str | Path) -> int:
    """Copy a log into one self-contained file (round groups copied in, no links); returns the rounds.

    The target must not exist; it appears only once complete.
    """
    source, target = Path(source), Path(target)
    if target.exists():
        raise LogError(f"'{target}' already exists: choose a new file name for the packed log")
    if target.resolve() in (source.resolve(), rounds_folder(source).resolve()):
        raise LogError(f"'{target}' is the log being packed: choose a new file name")
    with open_log(source, verify=True) as src:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_update(target, start_from_existing=False) as dst:
            for key, value in src.attrs.items():
                if key not in ("rounds_dir", "run_id"):
                    dst.attrs[key] = value
            dst.attrs["format_version"] = FORMAT_VERSION
            rounds = dst.create_group("rounds")
            keys = sorted(src["rounds"].keys())
            for key in keys:  # the round file's root group (split log) becomes a group here
                rounds.copy(src["rounds"][key], rounds, name=key)
    return len(keys)
