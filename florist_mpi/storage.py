"""The HDF5 run log: writing rounds crash-safely and reading them back.

Layout (docs/log-format.md, format_version 2): a run's log is an index file, `run.output`
(e.g. `runs/demo.h5`), plus a folder beside it named after it with `.rounds` appended
(`runs/demo.h5.rounds/`) that holds one HDF5 file per completed round. The index keeps the
header and links each round's group `/rounds/<r>` to its round file with an HDF5 external
link, so `h5py.File(log)["rounds/00003/global/..."]` reads through to the round file.
`pack_log` turns a log into one self-contained file (round groups copied in, no links);
logs of format_version 1 are such single files too. Every reader here handles both forms.

Crash safety (docs/crash-safety.md): nothing visible is ever opened for writing.

- A round is written to `<folder>/<r>-<run id>.h5.tmp`, fsynced and renamed to
  `<r>-<run id>.h5`; then the index is copied to `<log>.tmp` (it is small: header and
  links), the round's link is added, and the copy is fsynced and renamed over the index.
  The index rename is the commit: a round is visible only once it is linked, and a
  round file that is not linked (a kill between the two renames) is never read; the
  resumed run rewrites it. The cost of a round is its own data plus the small index.
- A new log writes its header with round 0; `replace` swaps an old log out only at the
  index rename (the new run's files carry a new run id, so they never touch the old
  run's), and the old run's round files are deleted after that.
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
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

FORMAT_VERSION = 2
ROUND_DIGITS = 5
ROUNDS_SUFFIX = ".rounds"  # the round files' folder: run.output + this suffix
PACK_HINT = "florist-mpi pack LOG OUT.h5 makes a single-file copy"

# The ranks/ group of a round: one dataset per figure, one value per MPI rank (docs/log-format.md).
RANK_COLUMNS = ("time_train", "time_wait", "clients", "peak_rss_bytes", "mpi_bytes_sent", "mpi_bytes_received",
                "peak_gpu_bytes")
Factors = tuple[np.ndarray, np.ndarray]  # (B m x r, A r x n)
ClientModule = Mapping[int, Factors]  # one module's factors of every logged client: client id -> (B, A)
ClientAdapters = Mapping[int, Mapping[str, Factors]] | Iterable[tuple[str, ClientModule]]
Hook = Callable[[], None] | None


class LogError(ValueError):
    """A user-facing problem with a log file; the message is one line."""


def round_key(round_index: int) -> str:
    return f"{round_index:0{ROUND_DIGITS}d}"


def rounds_folder(path: str | Path) -> Path:
    """The folder that holds a log's round files: `runs/demo.h5` -> `runs/demo.h5.rounds`."""
    path = Path(path)
    return path.with_name(path.name + ROUNDS_SUFFIX)


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; rename is still atomic
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
        _fsync_dir(self.path.parent)

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


def _split_info(path: Path) -> tuple[Path, str] | None:
    """(round-file folder, run id) of the split log at `path`, or None (absent, single-file, not a log)."""
    try:
        with h5py.File(path, "r") as handle:
            folder, run_id = handle.attrs.get("rounds_dir"), handle.attrs.get("run_id")
    except (OSError, KeyError):
        return None
    if folder is None or run_id is None:
        return None
    return path.parent / decode_str(folder), decode_str(run_id)


def _remove_run_files(folder: Path, run_id: str) -> None:
    """Delete one run's round files (after a replacing run published its index)."""
    pattern = re.compile(rf"\d{{{ROUND_DIGITS},}}-{re.escape(run_id)}\.h5(\.tmp)?")
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if pattern.fullmatch(name):
            (folder / name).unlink(missing_ok=True)
    try:
        folder.rmdir()  # only if nothing else is left in it
    except OSError:
        pass


class RoundWriter:
    """One round being written; nothing of it is visible until `commit`.

    Obtain with `begin_round`. Between that and `commit`, call `write_client_module` for
    each module whose client factors arrive (streaming; see the module docstring).
    """

    def __init__(self, path: Path, index: int, header: RunHeader | None, replace: bool):
        self.path, self.index, self.header, self.replace = path, index, header, replace
        self._done = False
        self._old: tuple[Path, str] | None = None
        if header is not None:
            self._start_new_log()
        else:
            self._start_append()

    # ------------------------------------------------------------------ opening

    def _start_new_log(self) -> None:
        path = self.path
        if path.exists() and not self.replace:
            raise LogError(
                f"log '{path}' already exists: pass --resume to continue it, --overwrite to replace it, "
                "or choose another run.output"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        self._old = _split_info(path) if path.exists() else None
        self.folder_name = rounds_folder(path).name
        self.run_id = _new_run_id()
        folder = path.parent / self.folder_name
        if folder.exists() and not folder.is_dir():
            raise LogError(f"'{folder}' exists and is not a folder: the log keeps its rounds there; "
                           "move that file away or choose another run.output")
        folder.mkdir(exist_ok=True)
        for stale in folder.glob("*.h5.tmp"):  # a killed writer's unpublished round
            stale.unlink(missing_ok=True)
        self.split = True
        self._open_round_file(folder)

    def _start_append(self) -> None:
        path = self.path
        with open_log(path, check_files=False) as handle:
            if round_key(self.index) in handle["rounds"]:
                raise LogError(f"log '{path}' already holds round {self.index}")
            info = _split_info(path)
        self.split = info is not None
        if self.split:
            folder, self.run_id = info
            self.folder_name = folder.name
            self._open_round_file(folder)
        else:  # single file (format 1 or packed): the round goes into a copy of the whole file
            self.shadow = _Shadow(path, start_from_existing=True)
            self.group = self.shadow.handle.require_group("rounds").create_group(round_key(self.index))

    def _open_round_file(self, folder: Path) -> None:
        self.round_name = f"{round_key(self.index)}-{self.run_id}.h5"
        self.round_path = folder / self.round_name
        self.round_temp = _shadow_path(self.round_path)
        self.round_temp.unlink(missing_ok=True)
        self.round_handle = h5py.File(self.round_temp, "w")
        self.group = self.round_handle["/"]

    # ------------------------------------------------------------------ writing

    def write_client_module(self, module: str, factors: ClientModule) -> None:
        """Write one module's factors of the given clients (client id -> (B m x r_k, A r_k x n))."""
        _write_client_module(self.group, module, factors)

    def commit(self, record: RoundRecord, *, root_attrs: dict | None = None,
               before_publish: Hook = None, before_link: Hook = None) -> None:
        """Write the rest of the round and make it visible atomically.

        `before_publish` (tests): called with the round written and flushed, nothing published.
        `before_link` (tests, split logs): called with the round file in place, not yet linked.
        """
        if record.index != self.index:
            raise ValueError(f"record of round {record.index} committed to the writer of round {self.index}")
        _write_round(self.group, record)
        if record.client_adapters is not None:
            for module, factors in _client_modules(record.client_adapters):
                self.write_client_module(module, factors)
                del factors  # let this module's factors go before the next module is produced
        if self.split:
            self._commit_split(root_attrs, before_publish, before_link)
        else:
            for key, value in (root_attrs or {}).items():
                self.shadow.handle.attrs[key] = value
            self.shadow.publish(before_rename=before_publish)
        self._done = True

    def _commit_split(self, root_attrs: dict | None, before_publish: Hook, before_link: Hook) -> None:
        self.round_handle.close()
        _fsync_file(self.round_temp)
        if before_publish is not None:
            before_publish()
        os.replace(self.round_temp, self.round_path)  # in place, but not visible until linked
        _fsync_dir(self.round_path.parent)
        if before_link is not None:
            before_link()
        link = h5py.ExternalLink(f"{self.folder_name}/{self.round_name}", "/")
        with _atomic_update(self.path, start_from_existing=self.header is None) as index:
            if self.header is not None:
                _write_header(index, self.header)
                index.attrs["rounds_dir"] = self.folder_name
                index.attrs["run_id"] = self.run_id
            for key, value in (root_attrs or {}).items():
                index.attrs[key] = value
            index.require_group("rounds")[round_key(self.index)] = link
        if self._old is not None and self._old[1] != self.run_id:
            _remove_run_files(*self._old)  # the replaced run's rounds; its index is gone already

    def discard(self) -> None:
        if self._done:
            return
        self._done = True
        if self.split:
            try:
                self.round_handle.close()
            finally:
                self.round_temp.unlink(missing_ok=True)
            if self.header is not None:  # a new log's folder that holds nothing: leave no trace
                try:
                    self.round_path.parent.rmdir()
                except OSError:
                    pass
        else:
            self.shadow.discard()

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
    before_publish: Hook = None, before_link: Hook = None,
) -> None:
    """Create a log with its first round in one atomic step.

    An existing file is refused unless `replace`; even then it is swapped out only
    once the new log is complete on disk, so a failed run never costs the old one.
    """
    with begin_round(path, first_round.index, header=header, replace=replace) as writer:
        writer.commit(first_round, before_publish=before_publish, before_link=before_link)


def append_round(path: str | Path, record: RoundRecord, before_publish: Hook = None,
                 root_attrs: dict | None = None, before_link: Hook = None) -> None:
    """Add one completed round (and update root attributes); it becomes visible atomically."""
    with begin_round(path, record.index) as writer:
        writer.commit(record, root_attrs=root_attrs, before_publish=before_publish, before_link=before_link)


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
            for key in keys:  # follows the link: the round file's content becomes a group here
                src.copy(src["rounds"][key], rounds, name=key)
    return len(keys)


# ------------------------------------------------------------------------ reading


@contextmanager
def open_log(path: str | Path, verify: bool = False, check_files: bool = True):
    """Open a log read-only (either form), turning anything that is not one into a LogError.

    Checks that every linked round file exists (~50 us a round; `check_files=False` skips
    it, for the writer, which reads no round); `verify` also opens each one (catches
    truncated copies; ~0.3 ms a round).
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
        if check_files:
            _check_round_files(handle, path, verify)
        yield handle
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
    """One-line LogError if a linked round file is missing (or, with `verify`, unreadable)."""
    folder = handle.attrs.get("rounds_dir")
    if folder is None:
        return  # a single-file log
    folder_path = path.parent / decode_str(folder)
    if not folder_path.is_dir():
        raise LogError(
            f"log '{path}' keeps its rounds in the folder '{folder_path}', which is missing (moved or renamed?): "
            f"put the folder back beside the log ({PACK_HINT})"
        )
    rounds = handle["rounds"]
    for key in rounds.keys():
        link = rounds.get(key, getlink=True)
        if not isinstance(link, h5py.ExternalLink):
            continue
        target = path.parent / link.filename
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
                f"copy the whole folder '{folder_path.name}' again, or use an intact copy of the log"
            )


def is_split(handle: h5py.File) -> bool:
    """True for an index + round folder log, False for a single-file (format 1 or packed) one."""
    return "rounds_dir" in handle.attrs


def completed_rounds(handle: h5py.File) -> list[int]:
    return sorted(int(key) for key in handle["rounds"].keys())


def round_is_empty(handle: h5py.File, round_index: int) -> bool:
    """True for a round that aggregated no client (federation.empty_round: skip): its global
    factors are rank 0 and the global model did not change. Logs from before the attribute
    `clients_aggregated` existed hold no such round."""
    attrs = handle["rounds"][round_key(round_index)].attrs
    return int(attrs.get("clients_aggregated", 1)) == 0


def read_global_factors(handle: h5py.File, round_index: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    group = handle["rounds"][round_key(round_index)]["global"]
    return {module: (group[module]["B"][()], group[module]["A"][()]) for module in group.keys()}


def read_modules(handle: h5py.File) -> list[str]:
    return [m.decode() if isinstance(m, bytes) else str(m) for m in handle.attrs["modules"]]


def decode_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
