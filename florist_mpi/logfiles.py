"""Which files make up a split log, and which of them a log owns.

A split log is the log file `run.output` (e.g. `runs/demo.h5`) plus the round folder whose name is
the log file's name with `.rounds` appended (`runs/demo.h5.rounds/`). The folder is always derived
from the log file's own path, never from a name stored inside it, so a pair that is copied or
renamed as a whole is a log of its own (docs/log-format.md, "Which files a log owns").

In that folder a log owns:

- its round files `<round>-<run id>.h5` (and `.h5.tmp` while one is written), `run id` being the
  log file's `run_id` attribute;
- what an unfinished creation or replacement of the log left: a writer that starts a new run id
  first writes the claim `<new run id>.pending` (holding the run id it replaces, if any), and
  removes it once its log file is published and the replaced run's files are deleted; the files
  of a claimed run id are that writer's.

Round files of any other run id belong to another log: they are never deleted, and a new log
(or a replacement) refuses to start in a folder that holds them.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_VERSION = 2  # the layout described in docs/log-format.md
ROUND_DIGITS = 5
ROUNDS_SUFFIX = ".rounds"  # the round files' folder: run.output + this suffix
CLAIM_SUFFIX = ".pending"  # `<run id>.pending`: a creation or replacement not finished yet
ROUND_FILE = re.compile(r"(\d{%d,})-([0-9a-f]+)\.h5(\.tmp)?" % ROUND_DIGITS)  # round, run id, temporary?
CLAIM_FILE = re.compile(r"([0-9a-f]+)" + re.escape(CLAIM_SUFFIX))


class LogError(ValueError):
    """A user-facing problem with a log file; the message is one line."""


def round_key(round_index: int) -> str:
    return f"{round_index:0{ROUND_DIGITS}d}"


def rounds_folder(path: str | Path) -> Path:
    """The folder that holds a log's round files: `runs/demo.h5` -> `runs/demo.h5.rounds`."""
    path = Path(path)
    return path.with_name(path.name + ROUNDS_SUFFIX)


def round_file_name(round_index: int, run_id: str) -> str:
    return f"{round_key(round_index)}-{run_id}.h5"


@dataclass
class FolderContents:
    """A round folder's round files and claims, by run id (files of other names are not listed)."""

    files: dict[str, list[str]] = field(default_factory=dict)  # run id -> round file names (and .tmp)
    claims: dict[str, str | None] = field(default_factory=dict)  # claimed run id -> the run id it replaces

    def foreign(self, own_id: str | None) -> dict[str, list[str]]:
        """Round files that neither the log of `own_id` nor an unfinished writer of it owns."""
        owned = {own_id, *self.claims, self.claims.get(own_id)} - {None}  # a claim of own_id: its cut clean-up
        return {run_id: names for run_id, names in self.files.items() if run_id not in owned}


def scan(folder: Path) -> FolderContents:
    contents = FolderContents()
    try:
        names = sorted(os.listdir(folder))
    except OSError:  # no folder (yet): nothing in it
        return contents
    for name in names:
        if match := ROUND_FILE.fullmatch(name):
            contents.files.setdefault(match.group(2), []).append(name)
        elif match := CLAIM_FILE.fullmatch(name):
            try:
                replaced = (folder / name).read_text().strip() or None
            except OSError:
                replaced = None
            contents.claims[match.group(1)] = replaced
    return contents


def _foreign_files_message(folder: Path, foreign: dict[str, list[str]], action: str) -> str:
    count = sum(len(names) for names in foreign.values())
    ids = ", ".join(sorted(foreign))
    return (
        f"'{folder}' holds {count} round file(s) of another log (run id {ids}), which {action} must not touch "
        "(a round folder copied, moved or left here without its log file?): move that folder back beside its "
        "log file or out of the way, or choose another run.output"
    )


def check_creatable(log_path: Path, own_id: str | None, action: str) -> None:
    """Refuse to create a log (or replace the one of run id `own_id`) whose folder holds another log's
    round files, or whose folder's name is taken by a file. `action` names the writer in the message."""
    folder = rounds_folder(log_path)
    if folder.exists() and not folder.is_dir():
        raise LogError(
            f"'{folder}' is a file, but the log keeps its round files in a folder of that name: "
            "move the file away or choose another run.output"
        )
    foreign = scan(folder).foreign(own_id)
    if foreign:
        raise LogError(_foreign_files_message(folder, foreign, action))


def _unlink(folder: Path, names: Iterable[str]) -> None:
    for name in names:
        (folder / name).unlink(missing_ok=True)


def settle(folder: Path, own_id: str | None, linked: set[str]) -> None:
    """Finish or undo what interrupted writers of this log left in its folder, and nothing else.

    `own_id`: the log's run id (None: no log file yet); `linked`: the round file names its log
    file links. Deletes the files of unfinished claims, finishes a published replacement whose
    clean-up was cut short (the replaced run's files), and deletes the log's own round files that
    no link names (a kill between a round file's rename and its link) and its own `.tmp` files.
    """
    contents = scan(folder)
    doomed: list[str] = []
    for claimed, replaced in contents.claims.items():
        if claimed == own_id:  # published; only the clean-up of the replaced run was cut short
            if replaced is not None and replaced != own_id:
                doomed += contents.files.get(replaced, [])
        else:  # never published: this writer's files are leftovers
            doomed += contents.files.get(claimed, [])
        doomed.append(f"{claimed}{CLAIM_SUFFIX}")
    if own_id is not None:
        doomed += [name for name in contents.files.get(own_id, []) if name not in linked]
    if doomed:
        _unlink(folder, doomed)
        fsync_dir(folder)


def claim(folder: Path, run_id: str, replaces: str | None) -> None:
    """Record, before any file of `run_id` is written, that those files are a pending writer's."""
    marker = folder / f"{run_id}{CLAIM_SUFFIX}"
    with open(marker, "w") as handle:
        handle.write(replaces or "")
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(folder)


def release(folder: Path, run_id: str, replaced: str | None) -> None:
    """After the log file of `run_id` is published: delete the replaced run's files, then the claim."""
    if replaced is not None and replaced != run_id:
        _unlink(folder, scan(folder).files.get(replaced, []))
    (folder / f"{run_id}{CLAIM_SUFFIX}").unlink(missing_ok=True)
    fsync_dir(folder)


def abandon(folder: Path, run_id: str) -> None:
    """A writer of a new run id that fails (no kill): delete its files and its claim."""
    _unlink(folder, scan(folder).files.get(run_id, []))
    (folder / f"{run_id}{CLAIM_SUFFIX}").unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
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


def missing_folder_message(log_path: Path, linked: set[str]) -> str:
    """The one line for a split log whose round folder is not beside it under its derived name.

    `linked`: the round file names the log file links; a round folder beside it that holds them
    (the pair's old name, or the original of a copied log file) is named as the way to fix it.
    """
    folder = rounds_folder(log_path)
    if folder.exists():
        return (f"'{folder}' is a file, but log '{log_path}' keeps its round files in a folder of that name: "
                "move the file away and put the round folder back")
    holders = _folders_holding(log_path.parent, linked) if linked else []
    if holders:
        return (
            f"log '{log_path}' keeps its rounds in the folder '{folder}', which is missing (moved or renamed?); "
            f"'{holders[0]}' beside it holds its round files (the log file or the folder renamed without the other?): "
            f"rename or copy that folder to '{folder.name}'"
        )
    return (
        f"log '{log_path}' keeps its rounds in the folder '{folder}', which is missing (moved or renamed?): "
        f"put the folder back beside the log as '{folder.name}' (florist-mpi pack LOG OUT.h5 makes a single-file "
        "copy)"
    )


def _folders_holding(parent: Path, linked: set[str]) -> list[str]:
    """Names of the round folders in `parent` that hold every one of the `linked` round files."""
    try:
        candidates = sorted(p for p in parent.iterdir() if p.name.endswith(ROUNDS_SUFFIX) and p.is_dir())
    except OSError:
        return []
    return [p.name for p in candidates if all((p / name).is_file() for name in linked)]
