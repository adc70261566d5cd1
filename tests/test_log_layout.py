"""The log's two forms: log file + round folder (format 2) and single file (format 1, packed).

Every test checks what is read back against the numbers that were written, and that
failures leave every published file as it was.
"""
from __future__ import annotations

import gc
import hashlib
import io
import json
import re
import shutil
import weakref

import h5py
import numpy as np
import pandas as pd
import pytest
from test_analysis import MODULES, build_log
from test_storage import header, record

from florist_mpi import analysis, cli, storage
from florist_mpi.storage import LogError


def digests(*paths):
    """sha256 of every file under the given files/folders."""
    found = {}
    for path in paths:
        for item in ([path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []):
            if item.is_file():
                found[str(item)] = hashlib.sha256(item.read_bytes()).hexdigest()
    return found


def round_files(path):
    return sorted(p.name for p in storage.rounds_folder(path).iterdir())


def links(path):
    """Link class of every round entry in the log file."""
    with h5py.File(path, "r") as handle:
        return {key: type(handle["rounds"].get(key, getlink=True)).__name__ for key in handle["rounds"]}


def explode():
    raise RuntimeError("killed")


# ------------------------------------------------------------------ the split layout


def test_rounds_live_in_their_own_files_linked_from_the_log(tmp_path):
    path = tmp_path / "log.h5"
    storage.create_log(path, header(), first_round=record(0))
    storage.append_round(path, record(1))
    assert links(path) == {"00000": "ExternalLink", "00001": "ExternalLink"}
    names = round_files(path)
    assert [n.split("-")[0] for n in names] == ["00000", "00001"] and all(n.endswith(".h5") for n in names)
    expected = record(1).global_factors["m.q"]
    with h5py.File(path, "r") as handle:  # plain h5py follows the links
        np.testing.assert_array_equal(handle["rounds/00001/global/m.q/B"][()], expected[0].astype(np.float32))
        assert handle["rounds/00001"].attrs["eval_loss"] == pytest.approx(0.5)
        assert handle.attrs["format_version"] == 2
    with h5py.File(storage.rounds_folder(path) / names[1], "r") as alone:  # and a round file reads on its own
        np.testing.assert_array_equal(alone["global/m.q/A"][()], expected[1].astype(np.float32))
    assert not list(tmp_path.glob("*.tmp")) and not list(storage.rounds_folder(path).glob("*.tmp"))


def test_the_log_file_stays_small_and_a_round_write_does_not_copy_earlier_rounds(tmp_path):
    path = tmp_path / "log.h5"
    big = record(0)
    big.client_adapters = {c: {"m.q": (np.ones((4000, 16)), np.ones((16, 3)))} for c in range(4)}  # ~1 MB a round
    storage.create_log(path, header(), first_round=big)
    for r in range(1, 6):
        big.index = r
        storage.append_round(path, big)
    round_sizes = [p.stat().st_size for p in storage.rounds_folder(path).iterdir()]
    assert min(round_sizes) > 1_000_000
    assert path.stat().st_size < 50_000  # header and links only, however many rounds


def test_streamed_client_adapters_are_written_one_module_at_a_time(tmp_path):
    """The writer keeps no reference to a module's factors once it asked for the next module."""
    path = tmp_path / "log.h5"
    modules = [f"m.{i}" for i in range(4)]
    g = np.random.default_rng(3)
    reference = {m: {c: (g.standard_normal((5, 2)), g.standard_normal((2, 3))) for c in (0, 2)} for m in modules}
    alive = []

    def stream():
        for m in modules:
            factors = {c: (B.copy(), A.copy()) for c, (B, A) in reference[m].items()}
            alive.append([weakref.ref(x) for pair in factors.values() for x in pair])
            yield m, factors
            del factors
            gc.collect()
            assert all(ref() is None for ref in alive[-1]), "the writer held on to a module's factors"

    rec = record(0)
    rec.client_adapters = stream()
    storage.create_log(path, header(), first_round=rec)
    assert len(alive) == len(modules)
    with h5py.File(path, "r") as handle:
        adapters = handle["rounds/00000/client_adapters"]
        assert sorted(adapters.keys()) == ["0", "2"]
        for m in modules:
            for c in (0, 2):
                np.testing.assert_array_equal(adapters[f"{c}/{m}/B"][()], reference[m][c][0].astype(np.float32))
                np.testing.assert_array_equal(adapters[f"{c}/{m}/A"][()], reference[m][c][1].astype(np.float32))


def test_round_writer_takes_modules_before_the_global_factors_and_discards_on_failure(tmp_path):
    path = tmp_path / "log.h5"
    storage.create_log(path, header(), first_round=record(0))
    before = digests(path, storage.rounds_folder(path))
    with pytest.raises(RuntimeError):
        with storage.begin_round(path, 1) as writer:
            writer.write_client_module("m.q", {3: (np.ones((4, 1)), np.full((1, 3), 2.0))})
            raise RuntimeError("aggregation failed")
    assert digests(path, storage.rounds_folder(path)) == before  # nothing left behind
    with storage.begin_round(path, 1) as writer:
        writer.write_client_module("m.q", {3: (np.ones((4, 1)), np.full((1, 3), 2.0))})
        rec = record(1)
        rec.client_adapters = None
        writer.commit(rec)
    run = analysis.open_run(path)
    assert run.client_adapters(1)[3]["m.q"][1].tolist() == [[2.0, 2.0, 2.0]]


@pytest.mark.parametrize("stage", ["before_publish", "before_link"])
def test_a_failure_before_the_link_leaves_the_log_as_it_was_and_the_round_is_rewritten(tmp_path, stage):
    """An error (a kill: tests/test_log_ownership.py) before the link: the round is not part of the log."""
    path = tmp_path / "log.h5"
    storage.create_log(path, header(), first_round=record(0))
    index_before = path.read_bytes()
    files_before = round_files(path)
    with pytest.raises(RuntimeError):
        storage.append_round(path, record(1), **{stage: explode})
    assert path.read_bytes() == index_before
    with storage.open_log(path) as handle:
        assert storage.completed_rounds(handle) == [0]
    assert round_files(path) == files_before  # the writer deleted the file it had renamed but not linked
    changed = record(1)
    changed.attrs["eval_loss"] = 7.0
    storage.append_round(path, changed)
    assert [n.split("-")[0] for n in round_files(path)] == ["00000", "00001"]
    assert analysis.open_run(path).rounds["eval_loss"].tolist() == [1.0, 7.0]


@pytest.mark.parametrize("stage", ["before_publish", "before_link", None])
def test_replacing_a_log_keeps_the_old_one_until_the_new_round_0_is_linked(tmp_path, stage):
    path = tmp_path / "log.h5"
    storage.create_log(path, header(), first_round=record(0))
    storage.append_round(path, record(1))
    old_files = round_files(path)
    before = digests(path, *[storage.rounds_folder(path) / n for n in old_files])
    fresh = record(0)
    fresh.attrs["eval_loss"] = 9.0
    if stage:
        with pytest.raises(RuntimeError):
            storage.create_log(path, header(), replace=True, first_round=fresh, **{stage: explode})
        assert digests(path, *[storage.rounds_folder(path) / n for n in old_files]) == before
        assert analysis.open_run(path).rounds["eval_loss"].tolist() == [1.0, 0.5]
    else:
        storage.create_log(path, header(), replace=True, first_round=fresh)
        assert analysis.open_run(path).rounds["eval_loss"].tolist() == [9.0]
        assert not set(round_files(path)) & set(old_files)  # the replaced run's files are gone


def test_a_new_log_that_fails_before_its_first_round_is_published_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        storage.create_log(tmp_path / "log.h5", header(), first_round=record(0), before_publish=explode)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ damaged copies


def _folder_renamed(path):
    storage.rounds_folder(path).rename(path.with_name("elsewhere"))


def _round_file_missing(path):
    (storage.rounds_folder(path) / round_files(path)[1]).unlink()


def _round_file_truncated(path):
    target = storage.rounds_folder(path) / round_files(path)[1]
    target.write_bytes(target.read_bytes()[:900])


def _log_file_missing(path):
    path.unlink()


DAMAGE = {
    "folder renamed": (_folder_renamed, "which is missing (moved or renamed?)"),
    "round file missing": (_round_file_missing, "the file of round 1"),
    "round file truncated": (_round_file_truncated, "is truncated or damaged"),
    "log file missing": (_log_file_missing, "its round folder"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_copy_gives_one_line_errors_everywhere(tmp_path, capsys, kind):
    damage, fragment = DAMAGE[kind]
    path = tmp_path / "log.h5"
    build_log(path)
    damage(path)
    with pytest.raises(LogError, match=re.escape(fragment)):
        analysis.open_run(path)
    for argv in (["report", str(path)], ["sweep-tau", str(path), "--out", str(tmp_path / "s")],
                 ["export", str(path), "--out", str(tmp_path / "e")], ["pack", str(path), str(tmp_path / "p.h5")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("florist-mpi: error:") and "\n" not in err and fragment in err, (argv, err)
    assert not any((tmp_path / n).exists() for n in ("s", "e", "p.h5"))


def test_the_round_folder_given_as_the_log_points_to_the_log_file(tmp_path):
    path = tmp_path / "log.h5"
    storage.create_log(path, header(), first_round=record(0))
    with pytest.raises(LogError, match="is the round folder of log 'log.h5'"):
        analysis.open_run(storage.rounds_folder(path))


# ------------------------------------------------------------------ format 1 and packed files


@pytest.mark.parametrize("form", ["format 1", "packed"])
def test_single_file_logs_read_like_the_split_log(tmp_path, capsys, form):
    split = tmp_path / "split.h5"
    written = build_log(split)
    single = tmp_path / "single.h5"
    if form == "format 1":
        build_log(single, legacy=True)
        with h5py.File(single, "r") as handle:
            assert handle.attrs["format_version"] == 1
    else:
        assert cli.main(["pack", str(split), str(single)]) == 0
        assert "packed 3 rounds" in capsys.readouterr().out
        with h5py.File(single, "r") as handle:
            assert handle.attrs["format_version"] == 2 and "rounds_dir" not in handle.attrs
            kinds = set()
            handle.visititems_links(lambda name, link: kinds.add(type(link).__name__))
            assert kinds == {"HardLink"}  # self-contained: no external links
        shutil.rmtree(storage.rounds_folder(split))  # the packed file needs nothing else
        split.unlink()
        split = tmp_path / "ref.h5"
        build_log(split)  # the same numbers again (build_log is deterministic)
    a, b = analysis.open_run(split), analysis.open_run(single)
    pd.testing.assert_frame_equal(a.rounds, b.rounds)
    pd.testing.assert_frame_equal(a.ranks, b.ranks)
    for r in range(3):
        kept = written["rounds"][r]["kept"]
        adapters = b.client_adapters(r)
        assert sorted(adapters) == kept
        for m in MODULES:
            want = written["rounds"][r]["global"][m][0].astype(np.float32)
            np.testing.assert_array_equal(b.global_factors(r)[m][0], want)
            np.testing.assert_array_equal(adapters[kept[0]][m][1], written["rounds"][r]["factors"][kept[0]][m][1])
    outputs = []
    for path in (split, single):
        for argv in (
            ["report", str(path), "--json"],
            ["sweep-tau", str(path), "--csv", "--out", str(tmp_path / path.stem)],
        ):
            assert cli.main(argv) == 0
            outputs.append(capsys.readouterr().out)
    report_a, sweep_a, report_b, sweep_b = outputs

    def strip(doc):
        skip = ("run", "label", "config")
        return [{k: v for k, v in run.items() if k not in skip} for run in json.loads(doc)["runs"]]

    assert strip(report_a) == strip(report_b)
    pd.testing.assert_frame_equal(pd.read_csv(io.StringIO(sweep_a)), pd.read_csv(io.StringIO(sweep_b)))


def test_single_file_logs_are_appended_in_their_own_form(tmp_path):
    path = tmp_path / "v1.h5"
    storage.legacy_create_log(path, header(), record(0))
    with pytest.raises(RuntimeError):
        storage.append_round(path, record(1), before_publish=explode)
    storage.append_round(path, record(1))
    assert links(path) == {"00000": "HardLink", "00001": "HardLink"}
    assert not storage.rounds_folder(path).exists()
    with h5py.File(path, "r") as handle:
        assert handle.attrs["format_version"] == 1  # still a valid format-1 file
        np.testing.assert_array_equal(handle["rounds/00001/client_adapters/0/m.q/B"][()], np.ones((4, 1)))


def test_pack_refuses_an_existing_target_and_leaves_it(tmp_path, capsys):
    path = tmp_path / "log.h5"
    storage.create_log(path, header(), first_round=record(0))
    target = tmp_path / "out.h5"
    target.write_bytes(b"keep me")
    assert cli.main(["pack", str(path), str(target)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and target.read_bytes() == b"keep me"


# ------------------------------------------------------------------ `run` refuses a broken log up front


def _run_args(tmp_path, log):
    from test_run import write_config

    config, _ = write_config(tmp_path)
    return ["run", str(config), "--set", f"run.output={log}"]


@pytest.mark.parametrize(
    "kind", ["folder is a file", "resume: log file gone", "resume: folder gone", "resume: round file truncated"]
)
def test_run_refuses_a_broken_log_in_one_line_and_touches_nothing(tmp_path, capsys, kind):
    log = tmp_path / "old.h5"
    build_log(log)
    extra, fragment = ["--resume"], None
    if kind == "folder is a file":
        log = tmp_path / "new.h5"
        storage.rounds_folder(log).write_text("not a folder")
        extra, fragment = [], "is a file, but the log keeps its round files in a folder of that name"
    elif kind == "resume: log file gone":
        log.unlink()
        fragment = "its round folder"
    elif kind == "resume: folder gone":
        storage.rounds_folder(log).rename(tmp_path / "moved")
        fragment = "which is missing (moved or renamed?)"
    else:
        _round_file_truncated(log)
        fragment = "is truncated or damaged"
    argv = _run_args(tmp_path, log) + extra
    before = digests(tmp_path)
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("florist-mpi: error:") and "\n" not in err and fragment in err, err
    assert digests(tmp_path) == before
