"""`florist-mpi report --scaling`: a study's speed-up, efficiencies, load, memory, phases and traffic,
checked against numbers recomputed from the logs with h5py and the statistics module; the refusals;
and the acceptance check on real demo-derived runs on 1 and 2 ranks (issue 19)."""
from __future__ import annotations

import hashlib
import io
import json
import statistics
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, mpi_env, run_mpi
from study_logs import study_overrides, write_study_log

from florist_mpi import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCALING_PLOTS = {"scaling_speedup.png", "scaling_efficiency.png", "scaling_phases.png", "scaling_vs_clients.png"}

# (clients, ranks, repeat) -> round times and each rank's training time per round
STUDY = {
    (4, 1, 0): ([3.0, 2.0, 2.2], [[2.0], [1.5], [1.6]]),
    (4, 1, 1): ([3.1, 2.1, 1.9], [[2.1], [1.6], [1.4]]),
    (4, 1, 2): ([3.0, 2.6, 2.5], [[2.1], [1.9], [1.8]]),  # three repeats: their mean is not their median
    (4, 2, 0): ([2.0, 1.2, 1.1], [[1.2, 0.8], [0.7, 0.5], [0.6, 0.6]]),
    (4, 2, 1): ([2.0, 1.0, 1.3], [[1.1, 0.9], [0.6, 0.4], [0.8, 0.5]]),
    (8, 2, 0): ([4.0, 2.5, 2.4], [[2.5, 2.0], [1.8, 1.5], [1.7, 1.6]]),
}
RSS = {1: [[400e6], [420e6], [410e6]], 2: [[300e6, 250e6], [320e6, 240e6], [310e6, 260e6]]}
SENT = {1: [[0], [0], [0]], 2: [[100, 5000], [120, 5100], [110, 5050]]}


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scaling")
    paths = {}
    for (clients, ranks, repeat), (round_s, train_s) in STUDY.items():
        path = folder / f"clients{clients}_ranks{ranks}_rep{repeat}.h5"
        write_study_log(path, clients=clients, round_s=round_s, train_s=train_s, rss=RSS[ranks],
                        mpi_sent=SENT[ranks], bytes_up=1000 * clients, bytes_down=3000 * clients,
                        startup=4.0 + ranks)
        paths[(clients, ranks, repeat)] = path
    return paths


def run_cli(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def logged(path, skip_first: bool = False) -> dict:
    """What the report is computed from, read straight from the HDF5 file."""
    with h5py.File(path, "r") as handle:
        keys = sorted(handle["rounds"])[1 if skip_first else 0:]
        rounds = [handle["rounds"][k] for k in keys]
        return {
            "time_round": [float(g.attrs["time_round"]) for g in rounds],
            "train": [g["ranks/time_train"][()] for g in rounds],
            "rss": [g["ranks/peak_rss_bytes"][()] for g in rounds],
            "sent": [g["ranks/mpi_bytes_sent"][()] for g in rounds],
            "world": int(rounds[0].attrs["world_size"]),
        }


def expected_medians(study_paths, skip_first=False) -> dict:
    return {key: statistics.median(logged(path, skip_first)["time_round"]) for key, path in study_paths.items()}


@pytest.mark.parametrize("skip_first", [False, True])
def test_json_speedup_and_efficiencies_follow_the_logged_round_times(study, capsys, skip_first):
    before = {key: digest(path) for key, path in study.items()}
    argv = ["report", "--scaling", *map(str, study.values()), "--json"] + (["--skip-first-round"] if skip_first else [])
    code, out, err = run_cli(capsys, argv)
    assert code == 0 and err == ""
    document = json.loads(out)
    medians = expected_medians(study, skip_first)
    runs = {(r["num_clients"], r["world_size"], r["repeat"]): r for r in document["runs"]}
    assert set(runs) == set(STUDY)
    # strong scaling among 4 clients: the reference is the mean over the three 1-rank repeats
    reference = statistics.mean([medians[(4, 1, r)] for r in range(3)])
    for key, run in runs.items():
        clients, ranks, _ = key
        assert run["median_round_s"] == pytest.approx(medians[key])
        assert run["rounds_used"] == (2 if skip_first else 3)
        if clients == 4:
            assert run["speedup"] == pytest.approx(reference / medians[key])
            assert run["efficiency"] == pytest.approx(reference / medians[key] / ranks)
            assert run["strong_reference_world"] == 1
        else:  # 8 clients were run on 2 ranks only: no speed-up to speak of
            assert run["speedup"] is None and run["efficiency"] is None
    # weak scaling, 4 clients per rank: 4 clients on 1 rank against 8 clients on 2
    assert runs[(8, 2, 0)]["weak_efficiency"] == pytest.approx(reference / medians[(8, 2, 0)])
    assert runs[(4, 1, 0)]["weak_efficiency"] == pytest.approx(reference / medians[(4, 1, 0)])
    assert runs[(4, 2, 0)]["weak_efficiency"] is None  # 2 clients per rank: only one world size
    # a point is the mean ± sample std over its repeats
    point = next(p for p in document["points"] if (p["num_clients"], p["world_size"]) == (4, 2))
    speedups = [reference / medians[(4, 2, r)] for r in (0, 1)]
    assert point["repeats"] == 2
    assert point["mean"]["speedup"] == pytest.approx(statistics.mean(speedups))
    assert point["std"]["speedup"] == pytest.approx(statistics.stdev(speedups))
    assert document["study"]["skip_first_round"] is skip_first
    assert {key: digest(path) for key, path in study.items()} == before  # the logs are only read


def test_load_memory_traffic_and_phases_per_log(study, capsys):
    code, out, _ = run_cli(capsys, ["report", "--scaling", *map(str, study.values()), "--csv"])
    assert code == 0
    frame = pd.read_csv(io.StringIO(out))
    assert len(frame) == len(STUDY)
    for (clients, ranks, repeat), path in study.items():
        row = frame[(frame["num_clients"] == clients) & (frame["world_size"] == ranks) & (frame["repeat"] == repeat)]
        assert len(row) == 1
        row = row.iloc[0]
        log = logged(path)
        imbalance = statistics.median([float(np.max(t) / np.mean(t)) for t in log["train"]])
        assert row["load_imbalance"] == pytest.approx(imbalance)
        assert row["peak_rss_bytes_max"] == pytest.approx(max(float(np.max(r)) for r in log["rss"]))
        per_rank_peaks = np.max(np.stack(log["rss"]), axis=0)
        assert row["peak_rss_bytes_mean"] == pytest.approx(float(per_rank_peaks.mean()))
        assert row["mpi_bytes_per_round"] == pytest.approx(statistics.mean(float(np.sum(s)) for s in log["sent"]))
        assert row["sim_bytes_up_per_round"] == 1000 * clients and row["sim_bytes_down_per_round"] == 3000 * clients
        assert row["time_startup_s"] == pytest.approx(4.0 + ranks)
        with h5py.File(path, "r") as handle:
            rounds = [handle["rounds"][k].attrs for k in sorted(handle["rounds"])]
            total = sum(a["time_round"] for a in rounds)
            for phase in ("train", "gather", "aggregate", "broadcast", "merge", "eval"):
                assert row[f"share_{phase}"] == pytest.approx(sum(a[f"time_{phase}"] for a in rounds) / total)
                assert row[f"time_{phase}_median_s"] == pytest.approx(statistics.median(a[f"time_{phase}"]
                                                                                         for a in rounds))
        shares = [row[f"share_{p}"] for p in ("train", "gather", "aggregate", "broadcast", "merge", "eval", "other")]
        assert sum(shares) == pytest.approx(1.0)


def test_text_names_speedup_and_efficiency_in_one_unit_per_table(study, capsys):
    code, out, err = run_cli(capsys, ["report", "--scaling", *map(str, study.values())])
    assert code == 0 and err == ""
    assert "speed-up" in out and "efficiency" in out
    medians = expected_medians(study)
    reference = statistics.mean([medians[(4, 1, r)] for r in range(3)])
    strong = out.split("Strong scaling", 1)[1].split("\n\n", 1)[0].splitlines()
    rows = {tuple(line.split()[:2]): line for line in strong[3:]}
    speedups = [reference / medians[(4, 2, r)] for r in (0, 1)]
    # 4 clients on 2 ranks: mean ± std of the speed-up and efficiency over the two repeats
    assert f"{statistics.mean(speedups):.2f} ± {statistics.stdev(speedups):.2f}" in rows[("4", "2")]
    assert f"{statistics.mean(speedups) / 2:.2f} ± {statistics.stdev(speedups) / 2:.2f}" in rows[("4", "2")]
    assert ("8", "2") not in rows  # no other world size for 8 clients
    weak = out.split("Weak scaling", 1)[1].split("\n\n", 1)[0]
    assert f"{reference / medians[(8, 2, 0)]:.2f}" in weak.splitlines()[-1]
    # one byte unit per table: MB for every memory column, kB for every traffic column
    memory = out.split("Load and memory", 1)[1].split("\n\n", 1)[0].splitlines()[1]
    assert "peak RSS max MB" in memory and "peak RSS mean MB" in memory
    traffic = out.split("Traffic per round", 1)[1].split("\n\n", 1)[0].splitlines()[1]
    assert traffic.count(" kB") == 3


def test_plots_are_pngs(study, tmp_path, capsys):
    out_dir = tmp_path / "plots"
    code, out, err = run_cli(capsys, ["report", "--scaling", *map(str, study.values()), "--plots", str(out_dir),
                                      "--json"])
    assert code == 0 and "wrote 4 plots" in err and json.loads(out)["runs"]
    assert {p.name for p in out_dir.iterdir()} == SCALING_PLOTS
    assert all(p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 10_000 for p in out_dir.iterdir())


def test_phase_plot_has_one_scale_for_every_point(study):
    from florist_mpi.analysis import open_run
    from florist_mpi.report.scaling import scaling_study
    from florist_mpi.report.scaling_plots import plot_phases

    runs = [open_run(p) for p in study.values()]
    figure = plot_phases(scaling_study(runs, [p.stem for p in study.values()]))
    assert len(figure.axes) == 1  # every point on the same axis
    top = figure.axes[0].get_ylim()[1]
    assert top >= max(statistics.median(v[0]) for v in STUDY.values())


def test_gpu_peaks_are_reported_when_logged(tmp_path, capsys):
    gpu = {1: [[3_000_000_000]], 2: [[2_000_000_000, 1_500_000_000]]}
    for ranks in (1, 2):
        write_study_log(tmp_path / f"clients4_ranks{ranks}_rep0.h5", clients=4, round_s=[1.0 / ranks],
                        train_s=[[0.5] * ranks], gpu=gpu[ranks])
    logs = sorted(map(str, tmp_path.glob("*.h5")))
    code, out, _ = run_cli(capsys, ["report", "--scaling", *logs, "--json"])
    runs = {r["world_size"]: r for r in json.loads(out)["runs"]}
    assert runs[1]["peak_gpu_bytes_max"] == 3e9 and runs[2]["peak_gpu_bytes_max"] == 2e9
    code, out, _ = run_cli(capsys, ["report", "--scaling", *logs])
    memory = out.split("Load and memory", 1)[1].split("\n\n", 1)[0].splitlines()
    assert "peak GPU max GB" in memory[1]
    assert [line.split()[5] for line in memory[3:]] == ["3.000", "2.000"]


def assert_refused(code, err, *fragments):
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("florist-mpi: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_logs_that_are_not_one_study_are_refused(study, tmp_path, capsys):
    other = tmp_path / "clients4_ranks2_lr.h5"
    write_study_log(other, clients=4, round_s=[1.0], train_s=[[0.5, 0.5]], extra={"train.lr": 0.01})
    before = digest(other)
    code, _, err = run_cli(capsys, ["report", "--scaling", str(study[(4, 1, 0)]), str(other)])
    assert_refused(code, err, "config key train.lr", "0.01 vs 0.005", "without --scaling")
    assert digest(other) == before

    old = tmp_path / "old.h5"  # written before rounds recorded time_round
    write_study_log(old, clients=4, round_s=[1.0], train_s=[[0.5]], time_round=False)
    code, _, err = run_cli(capsys, ["report", "--scaling", str(study[(4, 1, 0)]), str(old)])
    assert_refused(code, err, "no time_round in round 0", "rerun")

    short = tmp_path / "short.h5"
    write_study_log(short, clients=4, round_s=[1.0], train_s=[[0.5]])
    code, _, err = run_cli(capsys, ["report", "--scaling", str(short), "--skip-first-round"])
    assert_refused(code, err, "holds 1 round", "--skip-first-round")

    code, _, err = run_cli(capsys, ["report", str(short), "--skip-first-round"])
    assert_refused(code, err, "add --scaling")


def test_a_log_resumed_on_another_world_size_is_refused(tmp_path, capsys):
    from florist_mpi import storage

    path = tmp_path / "resumed.h5"
    write_study_log(path, clients=4, round_s=[1.0, 1.0], train_s=[[0.5, 0.5], [0.5, 0.5]])
    with h5py.File(storage.rounds_folder(path) / next(iter(sorted(p.name for p in storage.rounds_folder(path)
                                                                   .iterdir()))), "r+") as handle:
        handle.attrs["world_size"] = 1
    code, _, err = run_cli(capsys, ["report", "--scaling", str(path)])
    assert_refused(code, err, "1 and 2 MPI ranks", "one world size per log")


# ------------------------------------------------------------------ acceptance on real runs


DEMO_FAST = {"run.rounds": 2, "train.local_steps": 1, "data.synthetic.examples_per_client": 16,
             "data.synthetic.eval_examples": 32, "log.client_adapters": "false"}


def florist_command() -> list[str]:
    from pathlib import Path

    script = Path(sys.executable).parent / "florist-mpi"
    return [str(script)] if script.exists() else [sys.executable, "-m", "florist_mpi.cli"]


@pytest.mark.mpi
def test_demo_study_on_one_and_two_ranks(tmp_path):
    """Demo-derived configs on 1 and 2 ranks, then report --scaling: text, JSON and plots."""
    logs = {}
    for ranks in (1, 2):
        log = tmp_path / f"clients4_ranks{ranks}_rep0.h5"
        overrides = [a for o in study_overrides(4, log, DEMO_FAST) for a in ("--set", o)]
        result = run_mpi(ranks, [*florist_command(), "run", "configs/demo.yaml", *overrides], env=mpi_env(),
                         timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        logs[ranks] = log
        with h5py.File(log, "r") as handle:
            for key in sorted(handle["rounds"]):
                group = handle["rounds"][key]
                assert group.attrs["time_round"] >= group.attrs["time_train"] > 0
                assert group["ranks/time_train"].shape == (ranks,) and (group["ranks/time_train"][()] > 0).all()
                assert group["ranks/clients"][()].tolist() == [len(range(k, 4, ranks)) for k in range(ranks)]
                assert (group["ranks/peak_rss_bytes"][()] > 100 * 2**20).all()

    paths = [str(logs[1]), str(logs[2])]
    report = [*florist_command(), "report", "--scaling", *paths]
    text = subprocess.run(report, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert text.returncode == 0, text.stderr
    assert "speed-up" in text.stdout and "efficiency" in text.stdout

    document = json.loads(subprocess.run([*report, "--json"], capture_output=True, text=True, cwd=REPO,
                                         timeout=300, check=True).stdout)
    runs = {run["world_size"]: run for run in document["runs"]}
    for run in runs.values():
        assert {"world_size", "num_clients", "median_round_s", "speedup", "efficiency"} <= set(run)
        assert run["num_clients"] == 4
    medians = {ranks: statistics.median(logged(logs[ranks])["time_round"]) for ranks in (1, 2)}
    assert runs[2]["median_round_s"] == pytest.approx(medians[2])
    assert runs[2]["speedup"] == pytest.approx(medians[1] / medians[2])
    assert runs[2]["efficiency"] == pytest.approx(runs[2]["speedup"] / 2)
    assert runs[1]["speedup"] == pytest.approx(1.0)

    plots = tmp_path / "plots"
    drawn = subprocess.run([*report, "--plots", str(plots)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert drawn.returncode == 0, drawn.stderr
    assert {p.name for p in plots.iterdir()} == SCALING_PLOTS
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in plots.iterdir())
