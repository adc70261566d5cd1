"""`report` shows true round times (time_round, not the sum of per-phase maxima), one byte unit across
runs, summaries instead of per-client lists, where the launch ran, phase figures on one y-scale and a
note when loss curves coincide (issues 19 and 24)."""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from study_logs import write_study_log

from florist_mpi import cli

ROUND_S = [3.0, 2.0, 2.5]
TRAIN_S = [[1.0, 2.0], [1.5, 0.5], [1.2, 1.1]]  # uneven ranks: the sum of maxima is not the round


def run_cli(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """The rows of the first aligned table whose header line starts with `header_start`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


@pytest.fixture()
def two_logs(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    written = write_study_log(a, clients=4, round_s=ROUND_S, train_s=TRAIN_S, bytes_up=500, bytes_down=900)
    write_study_log(b, clients=4, round_s=[1.0, 1.0], train_s=[[0.5, 0.5], [0.4, 0.6]], bytes_up=5_000_000,
                    bytes_down=7_000_000, hosts=["n1", "n1", "n2", "n2"][:2])
    return a, b, written


def test_text_round_table_and_comparison_use_time_round(two_logs, capsys):
    a, b, written = two_logs
    code, out, err = run_cli(capsys, ["report", str(a), str(b)])
    assert code == 0 and err == ""
    block = out.split(f"== {b} ==")[0]
    rows = table_rows(block, "round")
    shown = [float(r[-1]) for r in rows if r[0].isdigit()]
    assert shown == pytest.approx(ROUND_S, abs=0.005)
    phase_sums = [sum(v for k, v in w["attrs"].items() if k in ("time_train", "time_gather", "time_aggregate",
                                                                   "time_broadcast", "time_merge", "time_eval"))
                  for w in written]
    assert not np.allclose(phase_sums, ROUND_S, atol=0.01)  # the old figure would differ
    total = next(r for r in rows if r[0] == "total")
    assert float(total[-1]) == pytest.approx(sum(ROUND_S), abs=0.005)
    # the phase table: shares of the summed round times, and the round itself
    phases = {r[0]: r for r in table_rows(block, "phase")}
    assert float(phases["round"][2]) == pytest.approx(sum(ROUND_S), abs=0.005)
    train_total = sum(max(t) for t in TRAIN_S)
    assert phases["train"][3] == f"{100 * train_total / sum(ROUND_S):.1f}%"
    assert "wait" in phases
    comparison = {r[0]: r for r in table_rows(out.split("Comparison", 1)[1].lstrip("\n"), "run")}
    assert comparison["a"][-2:] == [f"{np.median(ROUND_S):.2f}", f"{sum(ROUND_S):.1f}"]


def test_csv_and_json_carry_time_round(two_logs, capsys):
    a, b, _ = two_logs
    code, out, _ = run_cli(capsys, ["report", str(a), "--csv"])
    frame = pd.read_csv(io.StringIO(out))
    assert frame["time_round"].tolist() == pytest.approx(ROUND_S)
    assert frame["time_wait"].tolist() == pytest.approx([max(t) - min(t) for t in TRAIN_S])
    code, out, _ = run_cli(capsys, ["report", str(a), "--json"])
    document = json.loads(out)["runs"][0]
    assert document["totals"]["time_round"] == pytest.approx(sum(ROUND_S))
    assert document["summary"]["total_time_s"] == pytest.approx(sum(ROUND_S))
    assert document["summary"]["median_round_s"] == pytest.approx(np.median(ROUND_S))


def test_logs_without_time_round_fall_back_to_the_phase_sum_and_say_so(tmp_path, capsys):
    old = tmp_path / "old.h5"
    written = write_study_log(old, clients=4, round_s=ROUND_S, train_s=TRAIN_S, time_round=False)
    code, out, _ = run_cli(capsys, ["report", str(old)])
    assert code == 0
    phases = ("time_train", "time_gather", "time_aggregate", "time_broadcast", "time_merge", "time_eval")
    expected = [sum(w["attrs"][k] for k in phases) for w in written]
    shown = [float(r[-1]) for r in table_rows(out, "round") if r[0].isdigit()]
    assert shown == pytest.approx(expected, abs=0.005)
    assert "logged before time_round existed" in out


def test_byte_units_are_the_same_for_every_run(two_logs, capsys):
    a, b, _ = two_logs
    code, out, _ = run_cli(capsys, ["report", str(a), str(b)])
    headers = [line for line in out.splitlines() if line.startswith("round ") and "eval loss" in line]
    assert len(headers) == 2 and all("up MB" in h and "down MB" in h for h in headers)
    b_rows = table_rows(out.split(f"== {b} ==")[1], "round")  # run b: 5 MB up and 7 MB down per round
    assert [r[-3:-1] for r in b_rows if r[0].isdigit()] == [["5.000", "7.000"]] * 2


def test_headers_summarise_lora_ranks_and_the_launch(tmp_path, capsys):
    clients = 10_000
    ranks = [8] * 9_000 + [4] * 1_000
    log = tmp_path / "many.h5"
    write_study_log(log, clients=clients, round_s=[1.0], train_s=[[0.5, 0.5, 0.4, 0.6]],
                    hosts=["n1", "n1", "n2", "n2"], startup=12.5,
                    extra={"lora.ranks": "[" + ",".join(map(str, ranks)) + "]"})
    code, out, _ = run_cli(capsys, ["report", str(log)])
    assert code == 0
    header = out.split("\n\n", 1)[0]
    assert "LoRA ranks 8 ×9000, 4 ×1000," in header
    assert "latest launch: start-up 12.5 s | 2 nodes (n1 ×2, n2 ×2) | threads per rank 1 ×4" in header
    assert len(header) < 1000


def test_many_distinct_values_are_cut_short():
    from florist_mpi.report.summary import host_summary, short_histogram

    text = short_histogram(list(range(1, 65)) * 100)
    assert text.startswith("64 ×100, 63 ×100") and text.endswith("(64 distinct values)") and len(text) < 200
    hosts = [f"node{i:03d}" for i in range(100) for _ in range(8)]
    assert host_summary(hosts) == "100 nodes (node000 ×8, node001 ×8, node002 ×8, node003 ×8, ... 96 more)"


def test_phase_figures_share_one_y_scale(two_logs):
    from florist_mpi.analysis import open_run
    from florist_mpi.report.plots import phase_time_limit, plot_phase_times

    a, b, _ = two_logs
    runs = [open_run(a), open_run(b)]
    top = phase_time_limit(runs)
    limits = [plot_phase_times(run, run.label, top).axes[0].get_ylim() for run in runs]
    assert limits[0] == limits[1] and limits[0][0] == 0
    assert limits[0][1] >= max(ROUND_S)


def test_coinciding_curves_are_found_and_named(two_logs, tmp_path):
    from florist_mpi.analysis import open_run
    from florist_mpi.report.plots import Curve, coinciding, plot_metric_per_round

    x = np.arange(3)
    curves = [Curve("a", (0, 0, 0), x, np.array([5.0, 4.0, 3.0])),
              Curve("b", (0, 0, 0), x, np.array([5.0, 4.0, 3.0]) + 1e-6),   # hidden under a
              Curve("c", (0, 0, 0), x, np.array([5.0, 4.1, 3.0])),          # visibly apart
              Curve("d", (0, 0, 0), x + 1, np.array([5.0, 4.0, 3.0]))]      # other rounds
    assert coinciding(curves) == [None, 0, None, None]

    a, b, _ = two_logs  # both logs have the same eval losses in their common rounds, but b has 2 rounds
    same = tmp_path / "same.h5"
    write_study_log(same, clients=4, round_s=ROUND_S, train_s=TRAIN_S)
    figure = plot_metric_per_round([open_run(a), open_run(same), open_run(b)], ["a", "same", "b"])
    legend = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert legend[1].endswith("[same curve as a]") and "same curve" not in legend[0] + legend[2]
    notes = [t.get_text() for t in figure.axes[0].texts]
    assert "identical curves, drawn over each other: a = same" in notes
