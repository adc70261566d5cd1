"""A log's files belong to that log, whatever the user copies or renames (docs/log-format.md).

Storage-level tests build logs with the writer directly and kill it with a real SIGKILL at each
of its hooks (a forked child); the end-to-end tests at the bottom run `florist-mpi run` on a tiny
demo config. Every check compares sha256 digests of every file, or numbers read back against the
ones written, or a resumed run against an uninterrupted one.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import REPO, mpi_env
from test_log_layout import digests
from test_storage import header, record

from florist_mpi import analysis, cli, storage
from florist_mpi.storage import LogError, rounds_folder


def make_log(path, rounds=2):
    """A split log of `rounds` rounds; round r's eval_loss is 1 / (r + 1) (test_storage.record)."""
    storage.create_log(path, header(), first_round=record(0))
    for r in range(1, rounds):
        storage.append_round(path, record(r))


def record_with_loss(index, loss):
    rec = record(index)
    rec.attrs["eval_loss"] = loss
    return rec


def copy_pair(source, target):
    shutil.copy2(source, target)
    shutil.copytree(rounds_folder(source), rounds_folder(target))


def rename_pair(source, target):
    source.rename(target)
    rounds_folder(source).rename(rounds_folder(target))


def whole_log(path):
    """sha256 of the log file and of everything in its round folder."""
    return digests(path, rounds_folder(path))


def losses(path):
    return analysis.open_run(path).rounds["eval_loss"].tolist()


def link_names(path):
    """The targets of the log file's round links, as stored (folder part included)."""
    with h5py.File(path, "r") as handle:
        rounds = handle["rounds"]
        return sorted(rounds.get(key, getlink=True).filename for key in rounds)


def folder_holds_only_its_rounds(path):
    """The round folder holds exactly the files the log links, and they are named in its own folder."""
    names = link_names(path)
    return (all(n.startswith(rounds_folder(path).name + "/") for n in names)
            and sorted(p.name for p in rounds_folder(path).iterdir()) == [n.split("/")[1] for n in names])


def killed_at(hook, write):
    """Run `write(**{hook: kill})` in a forked child that SIGKILLs itself when the writer reaches `hook`."""
    pid = os.fork()
    if pid == 0:  # the child: no pytest clean-up, no atexit; it ends by the kill or by _exit
        try:
            write(**{hook: lambda: os.kill(os.getpid(), signal.SIGKILL)})
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the writer did not reach {hook}"


# ------------------------------------------------------------------ copies and renames


@pytest.mark.parametrize("action", ["overwrite", "resume"])
@pytest.mark.parametrize("acted_on", ["copy", "original"])
def test_a_copied_pair_and_its_original_never_touch_each_other(tmp_path, action, acted_on):
    original, copy = tmp_path / "a.h5", tmp_path / "b.h5"
    make_log(original)
    copy_pair(original, copy)  # the same run id on both sides
    target, other = (copy, original) if acted_on == "copy" else (original, copy)
    untouched = whole_log(other)
    if action == "overwrite":
        storage.create_log(target, header(), replace=True, first_round=record_with_loss(0, 9.0))
        expected = [9.0]
    else:
        storage.append_round(target, record(2))
        expected = [1.0, 0.5, 1 / 3]
    assert whole_log(other) == untouched
    assert losses(other) == [1.0, 0.5]
    assert losses(target) == pytest.approx(expected)
    assert folder_holds_only_its_rounds(target)  # the replaced run's files are gone from its own folder only
    with h5py.File(target, "r") as handle:  # plain h5py follows the re-pointed links into the target's folder
        assert [handle[f"rounds/{k}"].attrs["eval_loss"] for k in sorted(handle["rounds"])] == pytest.approx(expected)


def test_a_renamed_pair_reads_as_itself_and_is_relinked_by_its_next_write(tmp_path, capsys):
    first, second, third = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.h5"
    make_log(first)
    rename_pair(first, second)
    assert losses(second) == [1.0, 0.5]  # florist_mpi reads b.h5.rounds, whatever the links name
    with h5py.File(second, "r") as handle:  # plain h5py still follows the stored names: a.h5.rounds is gone
        with pytest.raises(KeyError):
            handle["rounds/00000"]
    kept_rounds = digests(rounds_folder(second))
    assert cli.main(["relink", str(second)]) == 0 and "relinked 2 rounds" in capsys.readouterr().out
    assert storage.relink_log(second) == 0 and digests(rounds_folder(second)) == kept_rounds  # the log file only
    assert folder_holds_only_its_rounds(second)
    with h5py.File(second, "r") as handle:
        assert handle["rounds/00001"].attrs["eval_loss"] == 0.5
    rename_pair(second, third)
    storage.append_round(third, record(2))  # any write re-points every link
    assert folder_holds_only_its_rounds(third)
    with h5py.File(third, "r") as handle:
        assert [handle[f"rounds/{k}"].attrs["eval_loss"] for k in sorted(handle["rounds"])] == pytest.approx(
            [1.0, 0.5, 1 / 3])


def test_a_copy_not_yet_written_is_read_from_its_own_folder_even_where_the_original_changed(tmp_path):
    original, copy = tmp_path / "a.h5", tmp_path / "b.h5"
    make_log(original)
    copy_pair(original, copy)
    storage.create_log(original, header(), replace=True, first_round=record_with_loss(0, 9.0))
    assert losses(copy) == [1.0, 0.5]  # not the original's new round 0, though the copy's links still name a.h5.rounds
    for argv in (["report", str(copy), "--json"], ["pack", str(copy), str(tmp_path / "packed.h5")]):
        assert cli.main(argv) == 0
    assert losses(tmp_path / "packed.h5") == [1.0, 0.5]


def test_a_log_file_moved_without_its_folder_is_refused_in_one_line_and_nothing_is_deleted(tmp_path, capsys):
    old, moved = tmp_path / "a.h5", tmp_path / "c.h5"
    make_log(old)
    old.rename(moved)
    before = digests(tmp_path)
    fix = "rename or copy that folder to 'c.h5.rounds'"
    with pytest.raises(LogError, match=fix):
        analysis.open_run(moved)
    with pytest.raises(LogError, match=fix):
        storage.append_round(moved, record(2))
    assert cli.main(["report", str(moved)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and fix in err, err
    # a new log at the old name would have to write beside the moved log's files: refused
    with pytest.raises(LogError, match=r"holds 2 round file\(s\) of another log"):
        storage.create_log(old, header(), first_round=record(0))
    assert digests(tmp_path) == before
    rounds_folder(old).rename(rounds_folder(moved))  # the fix the message gives
    assert losses(moved) == [1.0, 0.5]


def test_a_folder_moved_without_its_log_file_is_refused_and_an_overwrite_leaves_it_alone(tmp_path):
    log, elsewhere, alone = tmp_path / "a.h5", tmp_path / "n.h5", tmp_path / "far" / "a.h5"
    make_log(log)
    alone.parent.mkdir()
    shutil.copy2(log, alone)  # a log file with no round folder anywhere beside it
    rounds_folder(log).rename(rounds_folder(elsewhere))
    before = digests(tmp_path)
    fix = r"which is missing \(moved or renamed\?\); 'n.h5.rounds' beside it holds its round files .*: rename"
    for read_or_write in (lambda: analysis.open_run(log), lambda: storage.append_round(log, record(2))):
        with pytest.raises(LogError, match=fix):
            read_or_write()
    with pytest.raises(LogError, match=r"which is missing \(moved or renamed\?\): put the folder back"):
        analysis.open_run(alone)
    with pytest.raises(LogError, match="holds 2 round file"):  # a new log where the folder now is
        storage.create_log(elsewhere, header(), first_round=record(0))
    assert digests(tmp_path) == before
    moved_away = whole_log(elsewhere)
    storage.create_log(log, header(), replace=True, first_round=record_with_loss(0, 9.0))  # --overwrite: asked for
    assert losses(log) == [9.0] and folder_holds_only_its_rounds(log)
    assert digests(rounds_folder(elsewhere)) == moved_away


def test_another_logs_files_in_the_folder_are_never_touched(tmp_path):
    path, other = tmp_path / "a.h5", tmp_path / "o.h5"
    make_log(path)
    storage.create_log(other, header(), first_round=record(0))
    stray = rounds_folder(path) / next(rounds_folder(other).iterdir()).name
    shutil.copy2(next(rounds_folder(other).iterdir()), stray)  # another log's round file, copied in by hand
    kept = digests(stray)
    storage.append_round(path, record(2))
    assert digests(stray) == kept and losses(path) == pytest.approx([1.0, 0.5, 1 / 3])
    with pytest.raises(LogError, match=r"holds 1 round file\(s\) of another log"):  # nor replaced beside
        storage.create_log(path, header(), replace=True, first_round=record(0))
    assert digests(stray) == kept and losses(path) == pytest.approx([1.0, 0.5, 1 / 3])


# ------------------------------------------------------------------ kills at every point of a write


@pytest.mark.parametrize("then", ["resume", "overwrite"])
@pytest.mark.parametrize("point", ["before_publish", "before_link", "before_cleanup"])
def test_a_replacement_killed_anywhere_leaves_one_whole_log_and_the_next_run_cleans_up(tmp_path, point, then):
    path, sibling = tmp_path / "a.h5", tmp_path / "b.h5"
    make_log(path)
    copy_pair(path, sibling)  # a copy beside it, with the same run id
    old, sibling_before = whole_log(path), whole_log(sibling)
    killed_at(point, lambda **hook: storage.create_log(
        path, header(), replace=True, first_round=record_with_loss(0, 9.0), **hook))
    if point == "before_cleanup":  # published: the new log is complete, the old run's files not yet deleted
        assert losses(path) == [9.0]
    else:  # the old log exactly as it was
        assert {k: v for k, v in whole_log(path).items() if k in old} == old and losses(path) == [1.0, 0.5]
    leftovers = {p.name for p in rounds_folder(path).iterdir()} - {n.split("/")[1] for n in link_names(path)}
    assert any(name.endswith(".pending") for name in leftovers), leftovers
    if then == "resume":  # the next run that owns the log: continue it
        rounds = len(losses(path))
        storage.append_round(path, record(rounds))
    else:
        storage.create_log(path, header(), replace=True, first_round=record_with_loss(0, 8.0))
    assert folder_holds_only_its_rounds(path)  # no orphan, no claim, no replaced run's file
    assert whole_log(sibling) == sibling_before


@pytest.mark.parametrize("point", ["before_publish", "before_link"])
def test_an_append_killed_before_its_link_leaves_the_log_and_the_next_write_drops_the_orphan(tmp_path, point):
    path, sibling = tmp_path / "a.h5", tmp_path / "b.h5"
    make_log(path)
    copy_pair(path, sibling)
    old, sibling_before = whole_log(path), whole_log(sibling)
    killed_at(point, lambda **hook: storage.append_round(path, record(2), **hook))
    now = whole_log(path)
    orphans = set(now) - set(old)
    assert {k: now[k] for k in old} == old and len(orphans) == 1  # log file and rounds as they were, plus one file
    assert next(iter(orphans)).endswith(".h5.tmp" if point == "before_publish" else ".h5")
    storage.append_round(path, record_with_loss(2, 7.0))  # the resumed run writes that round again
    assert losses(path) == [1.0, 0.5, 7.0] and folder_holds_only_its_rounds(path)
    assert whole_log(sibling) == sibling_before


@pytest.mark.parametrize("point", ["before_publish", "before_link"])
def test_a_new_log_killed_before_it_exists_is_cleared_by_the_next_run_at_that_path(tmp_path, point):
    path = tmp_path / "a.h5"
    killed_at(point, lambda **hook: storage.create_log(path, header(), first_round=record(0), **hook))
    assert not path.exists() and any(p.name.endswith(".pending") for p in rounds_folder(path).iterdir())
    storage.create_log(path, header(), first_round=record_with_loss(0, 3.0))  # not refused: the files were claimed
    assert losses(path) == [3.0] and folder_holds_only_its_rounds(path)


def test_an_error_before_the_link_leaves_nothing_behind(tmp_path):
    """An error (not a kill) between the round file's rename and its link: the writer deletes its file."""
    path = tmp_path / "a.h5"
    make_log(path)
    before = whole_log(path)

    def fail():
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        storage.append_round(path, record(2), before_link=fail)
    with pytest.raises(RuntimeError):
        storage.create_log(path, header(), replace=True, first_round=record(0), before_link=fail)
    assert whole_log(path) == before


# ------------------------------------------------------------------ end to end: `florist-mpi run` on one rank

# configs/demo.yaml shrunk to seconds a run: 2 clients, one local step, no evaluation
TINY = {
    "federation.num_clients": 2, "federation.clients_per_round": 2, "lora.ranks": "[2,2]",
    "lora.target_modules": "[q_proj,v_proj]", "train.local_steps": 1, "eval.every": 0,
    "data.synthetic.examples_per_client": 8, "model.tiny.hidden_size": 16, "model.tiny.intermediate_size": 32,
    "model.tiny.num_hidden_layers": 1,
}


def florist_run(log, rounds, *flags, kill_at=None):
    """`python -m florist_mpi.cli run configs/demo.yaml` with TINY, as a user would start it on one process."""
    sets = [f"{key}={value}" for key, value in {**TINY, "run.output": log, "run.rounds": rounds}.items()]
    argv = [sys.executable, "-m", "florist_mpi.cli", "run", "configs/demo.yaml", *flags]
    argv += [arg for item in sets for arg in ("--set", item)]
    env = mpi_env()
    if kill_at:
        env["FLORIST_MPI_KILL_AT"] = kill_at
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    if kill_at:
        assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr[-2000:])
    else:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def global_factors(log):
    """Every round's global (B, A) as florist_mpi reads it back."""
    with storage.open_log(log) as handle:
        return {r: storage.read_global_factors(handle, r) for r in storage.completed_rounds(handle)}


def assert_same_rounds(log, reference, rounds):
    got, want = global_factors(log), global_factors(reference)
    for r in rounds:
        assert got[r].keys() == want[r].keys()
        for module, (B, A) in want[r].items():
            assert np.array_equal(got[r][module][0], B) and np.array_equal(got[r][module][1], A), (log, r, module)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 1-round log (`base`) and the same run continued to 2 rounds (`reference`), each by a real run."""
    tmp = tmp_path_factory.mktemp("runs")
    base, reference = tmp / "base.h5", tmp / "reference.h5"
    florist_run(base, 1)
    copy_pair(base, reference)
    florist_run(reference, 2, "--resume")
    return base, reference


@pytest.mark.mpi
def test_run_copies_overwritten_or_resumed_leave_the_other_side_byte_identical(tmp_path, runs):
    base, reference = runs
    original, copy, third = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.h5"
    copy_pair(base, original)
    copy_pair(original, copy)

    kept = whole_log(original)
    florist_run(copy, 2, "--resume")  # the copy resumed: the original does not change
    assert whole_log(original) == kept
    kept = whole_log(copy)
    florist_run(original, 2, "--resume")  # the original resumed: the copy does not change
    assert whole_log(copy) == kept
    for log in (original, copy):  # each resumed from its own files: the same as the uninterrupted run
        assert_same_rounds(log, reference, [0, 1])
        assert folder_holds_only_its_rounds(log)

    copy_pair(original, third)
    kept = whole_log(original) | whole_log(copy)
    florist_run(third, 1, "--overwrite")  # the copy overwritten
    assert whole_log(original) | whole_log(copy) == kept
    kept = whole_log(copy) | whole_log(third)
    florist_run(original, 1, "--overwrite")  # the original overwritten
    assert whole_log(copy) | whole_log(third) == kept
    for log in (original, third):  # a fresh round 0, the same as the first run's
        assert_same_rounds(log, base, [0])
        assert len(losses(log)) == 1 and folder_holds_only_its_rounds(log)
    assert cli.main(["report", str(copy)]) == 0 and len(losses(copy)) == 2


@pytest.mark.mpi
def test_run_a_renamed_pair_and_a_packed_copy_resume_like_the_uninterrupted_run(tmp_path, runs, capsys):
    base, reference = runs
    staged, renamed, packed = tmp_path / "staged.h5", tmp_path / "renamed.h5", tmp_path / "packed.h5"
    copy_pair(base, staged)
    rename_pair(staged, renamed)
    assert cli.main(["report", str(renamed)]) == 0
    florist_run(renamed, 2, "--resume")
    assert_same_rounds(renamed, reference, [0, 1])
    assert folder_holds_only_its_rounds(renamed)  # links re-pointed: plain h5py reads it too
    with h5py.File(renamed, "r") as handle:
        assert sorted(handle["rounds"]) == ["00000", "00001"] and "global" in handle["rounds/00000"]

    assert cli.main(["pack", str(base), str(packed)]) == 0
    florist_run(packed, 2, "--resume")
    assert_same_rounds(packed, reference, [0, 1])
    assert not rounds_folder(packed).exists()
    capsys.readouterr()


@pytest.mark.mpi
def test_run_refuses_a_file_or_folder_moved_alone_in_one_line_and_touches_nothing(tmp_path, runs, capsys):
    base, _ = runs
    moved_file, moved_folder = tmp_path / "file.h5", tmp_path / "folder.h5"
    copy_pair(base, moved_file)
    copy_pair(base, moved_folder)
    moved_file.rename(tmp_path / "file-renamed.h5")  # its folder stays as file.h5.rounds
    rounds_folder(moved_folder).rename(tmp_path / "elsewhere.h5.rounds")  # the file stays
    cases = [
        (tmp_path / "file-renamed.h5", ["--resume"], "rename or copy that folder to 'file-renamed.h5.rounds'"),
        (tmp_path / "file.h5", [], "holds 1 round file(s) of another log"),  # a new run beside the left folder
        (moved_folder, ["--resume"], "which is missing (moved or renamed?)"),
        (tmp_path / "elsewhere.h5", [], "holds 1 round file(s) of another log"),
        (tmp_path / "elsewhere.h5", ["--overwrite"], "holds 1 round file(s) of another log"),
    ]
    before = digests(tmp_path)
    for log, flags, fragment in cases:
        argv = ["run", str(REPO / "configs" / "demo.yaml"), *flags, "--set", f"run.output={log}"]
        code = cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("florist-mpi: error:") and "\n" not in err and fragment in err, (log, err)
    assert digests(tmp_path) == before


@pytest.mark.mpi
def test_run_killed_at_every_write_point_keeps_a_whole_log_and_the_next_run_cleans_up(tmp_path, runs):
    base, reference = runs
    log, sibling = tmp_path / "a.h5", tmp_path / "b.h5"
    copy_pair(base, log)
    copy_pair(base, sibling)
    sibling_kept, log_kept = whole_log(sibling), whole_log(log)
    for point in ("write@0", "link@0"):  # a replacement killed: the old log exactly as it was, plus leftovers
        florist_run(log, 1, "--overwrite", kill_at=point)
        now = whole_log(log)
        assert {k: now[k] for k in log_kept} == log_kept and any(k.endswith(".pending") for k in now), point
    for point in ("write@1", "link@1"):  # an append killed: the log file and its rounds as they were
        florist_run(log, 2, "--resume", kill_at=point)
        now = whole_log(log)
        assert {k: now[k] for k in log_kept} == log_kept, point
        assert analysis.open_run(log).round_indices == [0]
    # a replacement killed after its log file was published, before the replaced run's files were deleted
    florist_run(log, 1, "--overwrite", kill_at="clean@0")
    assert analysis.open_run(log).round_indices == [0] and not folder_holds_only_its_rounds(log)
    assert_same_rounds(log, reference, [0])
    florist_run(log, 2, "--resume")  # the next run that owns the log
    assert folder_holds_only_its_rounds(log)  # every leftover gone: claims, unpublished and orphaned files
    assert_same_rounds(log, reference, [0, 1])
    assert whole_log(sibling) == sibling_kept
