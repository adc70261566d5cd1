"""The HDF5 run log: writing rounds crash-safely and reading them back.

Layout: docs/log-format.md. Crash safety (docs/crash-safety.md): the live log is
never opened for writing. Each round is written into a copy beside it, the copy
is flushed to disk, and `os.replace` swaps it in. A kill at any moment leaves
either the previous complete log or the new complete log; never a partial round.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

FORMAT_VERSION = 1
ROUND_DIGITS = 5


class LogError(ValueError):
    """A user-facing problem with a log file; the message is one line."""


def round_key(round_index: int) -> str:
    return f"{round_index:0{ROUND_DIGITS}d}"


@dataclass
class RoundRecord:
    """Everything one completed round adds to the log."""

    index: int
    attrs: dict
    clients: dict[str, np.ndarray]
    excluded: list[tuple[int, str]]
    # module -> (B, A, singular_values, rank, energy)
    global_factors: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int, float]]
    client_adapters: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] | None = None


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
    """Copy a log; copy_file_range lets file systems that can share extents (XFS, btrfs)
    or copy server-side (NFS 4.2) do so, which keeps the per-round copy cheap there."""
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


@contextmanager
def _atomic_update(path: Path, start_from_existing: bool):
    """Yield an open h5py.File on a shadow copy; publish it atomically on success."""
    shadow = _shadow_path(path)
    if shadow.exists():
        shadow.unlink()  # left by a run killed mid-write; the live log is intact
    if start_from_existing:
        _copy_file(path, shadow)
    try:
        with h5py.File(shadow, "a" if start_from_existing else "w-") as handle:
            yield handle
        _fsync_file(shadow)
        os.replace(shadow, path)
        _fsync_dir(path.parent)
    except BaseException:
        shadow.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------ writing


def create_log(
    path: str | Path, header: RunHeader, *, replace: bool = False, first_round: RoundRecord | None = None,
    before_publish=None,
) -> None:
    """Create a log (with its first round, if given) in one atomic step.

    An existing file is refused unless `replace`; even then it is swapped out only
    once the new log is complete on disk, so a failed run never costs the old one.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise LogError(
            f"log '{path}' already exists: pass --resume to continue it, --overwrite to replace it, "
            "or choose another run.output"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_update(path, start_from_existing=False) as handle:
        _write_header(handle, header)
        rounds = handle.create_group("rounds")
        if first_round is not None:
            _write_round(rounds.create_group(round_key(first_round.index)), first_round)
        handle.flush()
        if before_publish is not None:
            before_publish()


def _write_header(handle: h5py.File, header: RunHeader) -> None:
    attrs = handle.attrs
    attrs["format_version"] = FORMAT_VERSION
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


def append_round(path: str | Path, record: RoundRecord, before_publish=None, root_attrs: dict | None = None) -> None:
    """Add one completed round (and update root attributes); it becomes visible atomically.

    `before_publish` (tests only) is called with the round written but not yet published.
    """
    path = Path(path)
    with _atomic_update(path, start_from_existing=True) as handle:
        for key, value in (root_attrs or {}).items():
            handle.attrs[key] = value
        rounds = handle.require_group("rounds")
        key = round_key(record.index)
        if key in rounds:
            raise LogError(f"log '{path}' already holds round {record.index}")
        _write_round(rounds.create_group(key), record)
        handle.flush()
        if before_publish is not None:
            before_publish()


def _write_round(group: h5py.Group, record: RoundRecord) -> None:
    for key, value in record.attrs.items():
        group.attrs[key] = value
    clients = group.create_group("clients")
    for key, values in record.clients.items():
        clients.create_dataset(key, data=np.asarray(values))
    clients.create_dataset("excluded", data=np.array([cid for cid, _ in record.excluded], dtype=np.int64))
    clients.create_dataset(
        "excluded_reason", data=np.array([why for _, why in record.excluded], dtype=h5py.string_dtype())
    )
    global_group = group.create_group("global")
    for module, (B, A, sv, rank, energy) in record.global_factors.items():
        node = global_group.create_group(module)
        node.create_dataset("B", data=np.ascontiguousarray(B, dtype=np.float32))
        node.create_dataset("A", data=np.ascontiguousarray(A, dtype=np.float32))
        node.create_dataset("singular_values", data=np.asarray(sv, dtype=np.float64))
        node.attrs["rank"] = int(rank)
        node.attrs["energy"] = float(energy)
    if record.client_adapters:
        adapters = group.create_group("client_adapters")
        for cid, modules in sorted(record.client_adapters.items()):
            client_group = adapters.create_group(str(cid))
            for module, (B, A) in modules.items():
                node = client_group.create_group(module)
                node.create_dataset("B", data=np.ascontiguousarray(B, dtype=np.float32))
                node.create_dataset("A", data=np.ascontiguousarray(A, dtype=np.float32))


# ------------------------------------------------------------------------ reading


@contextmanager
def open_log(path: str | Path):
    """Open a log read-only, turning anything that is not one into a LogError."""
    path = Path(path)
    if not path.is_file():
        raise LogError(f"log '{path}' not found: give the path of a run's .h5 log (run.output)")
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
        yield handle
    finally:
        handle.close()


def completed_rounds(handle: h5py.File) -> list[int]:
    return sorted(int(key) for key in handle["rounds"].keys())


def read_global_factors(handle: h5py.File, round_index: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    group = handle["rounds"][round_key(round_index)]["global"]
    return {module: (group[module]["B"][()], group[module]["A"][()]) for module in group.keys()}


def read_modules(handle: h5py.File) -> list[str]:
    return [m.decode() if isinstance(m, bytes) else str(m) for m in handle.attrs["modules"]]


def decode_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
