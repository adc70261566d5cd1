"""Reading logs (analysis), `florist-mpi report` and `florist-mpi sweep-tau` on synthetic logs.

The logs are written with storage.create_log / append_round from known numbers; global
factors come from aggregation.aggregate over random client factors, and the sweep is
checked against spectra of the dense Σ p_k B_k A_k computed independently in float64.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from florist_mpi import analysis, cli, storage
from florist_mpi.aggregation import aggregate, select_rank
from florist_mpi.config import ExperimentConfig
from florist_mpi.storage import LogError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
SHAPES = [(12, 10), (12, 10), (10, 16)]
CLIENT_RANKS = [4, 3, 2, 2]
SAMPLES = [30, 10, 25, 15]
EXCLUDED = {1: [(2, "non-finite factors (NaN/Inf)")]}  # round -> [(client, reason)]


# ------------------------------------------------------------------ log builder


def build_log(path, *, method="florist", tau=0.9, rounds=3, modules=MODULES, shapes=SHAPES, ranks=CLIENT_RANKS,
              samples=SAMPLES, adapters=True, excluded=EXCLUDED, seed=0, eval_every=1, accuracy=False,
              world_sizes=None, legacy=False):
    """Write a log; return what was written: {'rounds': {r: {...}}, 'header': RunHeader}.

    `accuracy`: log MMLU-style accuracies (eval_loss NaN) instead of losses; `world_sizes`: a
    per-round `world_size` attribute (as logs written since rounds record it have); `legacy`: the
    single-file layout of format_version 1.
    """
    num_clients = len(ranks)
    cfg = ExperimentConfig.model_validate({
        "run": {"rounds": rounds, "output": str(path)},
        "federation": {"num_clients": num_clients, "method": method, "tau": tau},
        "lora": {"ranks": list(ranks), "alpha": "2r"},
        "log": {"client_adapters": adapters},
    })
    header = storage.RunHeader(
        config_yaml=cfg.to_yaml(), method=method, tau=tau, num_clients=num_clients, world_size=2,
        created="2026-01-01T00:00:00+00:00", versions={"florist_mpi": "test", "torch": torch.__version__},
        modules=list(modules), module_shapes=list(shapes), initial_eval_loss=4.5,
    )
    g = np.random.default_rng(seed)
    written = {"header": header, "rounds": {}}
    for r in range(rounds):
        dropped = dict(excluded.get(r, []))
        kept = [c for c in range(num_clients) if c not in dropped]
        factors = {
            c: {m: ((g.standard_normal((shape[0], ranks[c])) * 0.3).astype(np.float32),
                    g.standard_normal((ranks[c], shape[1])).astype(np.float32))
                for m, shape in zip(modules, shapes)}
            for c in kept
        }
        if method == "ffa":  # FFA-LoRA: every client's A is a prefix of one shared frozen A
            shared = {
                m: g.standard_normal((max(ranks), shape[1])).astype(np.float32) for m, shape in zip(modules, shapes)
            }
            factors = {c: {m: (B, shared[m][: ranks[c]]) for m, (B, _) in per.items()} for c, per in factors.items()}
        global_factors = {}
        for m in modules:
            result = aggregate(
                method,
                [(torch.from_numpy(factors[c][m][0]), torch.from_numpy(factors[c][m][1])) for c in kept],
                [samples[c] for c in kept],
                tau=tau,
            )
            global_factors[m] = (
                result.B.numpy(),
                result.A.numpy(),
                result.singular_values.numpy(),
                result.rank,
                result.energy,
            )
        down = (
            4 * num_clients * sum(gf[3] * (shape[0] + shape[1]) for gf, shape in zip(global_factors.values(), shapes))
        )
        up = 4 * sum(ranks[c] * (s[0] + s[1]) for c in kept for s in shapes)
        attrs = {
            "tau": tau,
            "time_train": 1.0 + r,
            "time_gather": 0.1,
            "time_aggregate": 0.05 * (r + 1),
            "time_broadcast": 0.02,
            "time_merge": 0.01,
            "time_eval": 0.3,
            "bytes_up": int(up),
            "bytes_down": int(down),
            "eval_loss": 4.0 - 0.5 * r if r % eval_every == 0 else math.nan,
            "eval_accuracy": math.nan,
        }
        if accuracy:
            attrs["eval_loss"], attrs["eval_accuracy"] = math.nan, [0.25, 0.5, 0.375, 0.625][r % 4]
        if world_sizes is not None:
            attrs["world_size"] = world_sizes[r]
        record = storage.RoundRecord(
            index=r,
            attrs=attrs,
            clients={
                "id": np.arange(num_clients, dtype=np.int64),
                "num_samples": np.array(samples, dtype=np.int64),
                "rank": np.array(ranks, dtype=np.int64),
                "train_loss": np.array([math.nan if c in dropped else 5.0 - 0.1 * c for c in range(num_clients)]),
            },
            excluded=sorted(dropped.items()),
            global_factors=global_factors,
            client_adapters=factors if adapters else None,
        )
        if r == 0 and legacy:
            storage.legacy_create_log(path, header, record)
        elif r == 0:
            storage.create_log(path, header, first_round=record)
        else:
            storage.append_round(path, record)
        written["rounds"][r] = {"attrs": attrs, "factors": factors, "kept": kept, "global": global_factors}
    return written


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    base = tmp_path_factory.mktemp("logs")
    made = {}
    for name, kwargs in {
        "florist": {},
        "florist_tau1": {"tau": 1.0, "seed": 1},
        "fedit": {"method": "fedit", "tau": 1.0, "seed": 2, "adapters": False, "eval_every": 2},
        "mmlu": {"tau": 0.8, "seed": 3, "adapters": False, "accuracy": True, "world_sizes": [1, 1, 2]},
    }.items():
        path = base / f"{name}.h5"
        made[name] = (path, build_log(path, **kwargs))
    return made


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("florist-mpi: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def dense_spectrum(factors, kept, weights, module) -> torch.Tensor:
    """Singular values of Σ p_k B_k A_k, formed densely in float64."""
    p = np.array([weights[c] for c in kept], dtype=np.float64)
    p /= p.sum()
    delta = sum(
        pk * torch.from_numpy(factors[c][module][0]).double() @ torch.from_numpy(factors[c][module][1]).double()
        for pk, c in zip(p, kept)
    )
    return torch.linalg.svdvals(delta)


# ------------------------------------------------------------------ open_run


def test_open_run_header_and_round_frame(logs):
    path, written = logs["florist"]
    run = analysis.open_run(path)
    assert isinstance(run.config, ExperimentConfig) and run.config.lora.ranks == CLIENT_RANKS
    assert (run.method, run.tau, run.num_clients, run.world_size) == ("florist", 0.9, 4, 2)
    assert run.versions["florist_mpi"] == "test"
    assert run.modules == MODULES
    assert run.module_shapes == dict(zip(MODULES, SHAPES))
    assert run.initial_eval_loss == 4.5
    assert run.round_indices == [0, 1, 2]

    frame = run.rounds
    assert frame.index.name == "round" and frame.index.tolist() == [0, 1, 2]
    for column in (
        "eval_loss",
        "eval_accuracy",
        "tau",
        *analysis.PHASES,
        "bytes_up",
        "bytes_down",
        "mean_rank",
        "num_clients",
        "num_excluded",
        "cum_bytes_down",
        "cum_bytes_up",
    ):
        assert column in frame.columns, column
    for r, info in written["rounds"].items():
        for key, value in info["attrs"].items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(frame.loc[r, key])
            else:
                assert frame.loc[r, key] == pytest.approx(value), key
        ranks = [info["global"][m][3] for m in MODULES]
        assert frame.loc[r, "mean_rank"] == pytest.approx(np.mean(ranks))
        assert frame.loc[r, "num_clients"] == len(info["kept"])
        assert frame.loc[r, "num_excluded"] == len(EXCLUDED.get(r, []))
    assert (
        frame["cum_bytes_down"].tolist()
        == np.cumsum([w["attrs"]["bytes_down"] for w in written["rounds"].values()]).tolist()
    )
    assert frame["cum_bytes_up"].iloc[-1] == sum(w["attrs"]["bytes_up"] for w in written["rounds"].values())

    ranks = run.ranks
    assert ranks.index.tolist() == MODULES and ranks.columns.tolist() == [0, 1, 2]
    for r, info in written["rounds"].items():
        assert ranks[r].tolist() == [info["global"][m][3] for m in MODULES]


def test_open_run_round_reads(logs):
    path, written = logs["florist"]
    run = analysis.open_run(path)
    info = written["rounds"][1]

    clients = run.clients(1)
    assert clients["id"].tolist() == [0, 1, 2, 3]
    assert clients["num_samples"].tolist() == SAMPLES
    assert clients["rank"].tolist() == CLIENT_RANKS
    assert np.isnan(clients["train_loss"].iloc[2]) and clients["train_loss"].iloc[0] == pytest.approx(5.0)
    assert clients["excluded"].tolist() == [False, False, True, False]
    assert clients["excluded_reason"].iloc[2].startswith("non-finite")
    assert run.aggregation_weights(1) == {0: 30, 1: 10, 3: 15}

    module = MODULES[2]
    np.testing.assert_array_equal(run.spectrum(1, module), info["global"][module][2])
    factors = run.global_factors(1)
    assert list(factors) == MODULES
    for m in MODULES:
        np.testing.assert_array_equal(factors[m][0], info["global"][m][0].astype(np.float32))
        np.testing.assert_array_equal(factors[m][1], info["global"][m][1].astype(np.float32))

    adapters = run.client_adapters(1)
    assert sorted(adapters) == info["kept"]
    for c in info["kept"]:
        for m in MODULES:
            np.testing.assert_array_equal(adapters[c][m][0], info["factors"][c][m][0])
            np.testing.assert_array_equal(adapters[c][m][1], info["factors"][c][m][1])

    # -1 is the last round; the file is not held open between calls
    np.testing.assert_array_equal(run.global_factors(-1)[MODULES[0]][0], written["rounds"][2]["global"][MODULES[0]][0])
    with h5py.File(path, "r+"):
        pass


def test_open_run_errors_name_the_problem(logs, tmp_path):
    path, _ = logs["florist"]
    run = analysis.open_run(path)
    with pytest.raises(LogError, match="round 7 is not in log"):
        run.clients(7)
    with pytest.raises(LogError, match="round 7"):
        run.spectrum(7, MODULES[0])
    with pytest.raises(LogError, match="module 'nope'"):
        run.spectrum(0, "nope")
    fedit_path, _ = logs["fedit"]
    with pytest.raises(LogError, match="log.client_adapters: true"):
        analysis.open_run(fedit_path).client_adapters(0)


def test_open_run_is_fast_for_64_modules_and_50_rounds(tmp_path):
    path = tmp_path / "big.h5"
    modules = [f"model.layers.{i // 4}.self_attn.{'qkvo'[i % 4]}_proj" for i in range(64)]
    header = storage.RunHeader("run: {}\n", "florist", 0.9, 2, 1, "2026", {}, modules, [(4, 3)] * 64)
    B, A = np.ones((4, 2), np.float32), np.ones((2, 3), np.float32)
    with h5py.File(path, "w") as handle:  # the writer's layout, built directly: 50 atomic appends would copy 50 times
        storage._write_header(handle, header)
        rounds = handle.create_group("rounds")
        for r in range(50):
            storage._write_round(
                rounds.create_group(storage.round_key(r)),
                storage.RoundRecord(
                    r,
                    {"eval_loss": 1.0, "bytes_down": 10, "bytes_up": 5, "time_train": 1.0},
                    {"id": np.arange(2), "num_samples": np.array([1, 2])},
                    [],
                    {m: (B, A, np.array([2.0, 1.0]), 1 + (r + i) % 2, 0.9) for i, m in enumerate(modules)},
                ),
            )
    start = time.perf_counter()
    run = analysis.open_run(path)
    elapsed = time.perf_counter() - start
    assert run.ranks.shape == (64, 50) and len(run.rounds) == 50
    assert run.rounds["mean_rank"].iloc[0] == pytest.approx(1.5)
    assert elapsed < 5.0


# ------------------------------------------------------------------ bad files via the CLI


def _missing(tmp_path):
    return tmp_path / "absent.h5"


def _text_file(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("this is not HDF5\n")
    return path


def _foreign_hdf5(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("x", data=np.arange(3))
        handle.attrs["something"] = 1
    return path


def _truncated(tmp_path):
    path = tmp_path / "truncated.h5"
    build_log(path, rounds=2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


BAD_FILES = {
    "missing": (_missing, "not found"),
    "not-hdf5": (_text_file, "not a readable HDF5 file"),
    "truncated": (_truncated, "not a readable HDF5 file"),
    "foreign-hdf5": (_foreign_hdf5, "not a florist_mpi run log"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_files_give_one_line_errors(kind, tmp_path, capsys):
    make, fragment = BAD_FILES[kind]
    path = make(tmp_path)
    before = digest(path) if path.exists() else None
    with pytest.raises(LogError, match=fragment):
        analysis.open_run(path)
    for argv in (["report", str(path)], ["report", str(path), "--csv"], ["sweep-tau", str(path)]):
        code, out, err = run_cli(capsys, argv)
        assert_one_line_error(code, err, fragment, str(path))
        assert out == ""
    assert (digest(path) if path.exists() else None) == before


def test_missing_round_and_missing_adapters_via_cli(logs, capsys):
    path, _ = logs["florist"]
    fedit_path, _ = logs["fedit"]
    before = digest(path), digest(fedit_path)
    code, out, err = run_cli(capsys, ["sweep-tau", str(path), "--round", "9"])
    assert_one_line_error(code, err, "round 9 is not in log")
    code, out, err = run_cli(capsys, ["sweep-tau", str(fedit_path), "--taus", "0.9,1"])
    assert_one_line_error(code, err, "no client adapters", "log.client_adapters: true")
    code, out, err = run_cli(capsys, ["sweep-tau", str(path), "--taus", "0.5:1.5:0.5"])
    assert_one_line_error(code, err, "(0, 1]")
    assert (digest(path), digest(fedit_path)) == before


# ------------------------------------------------------------------ report


def test_report_text_single_and_comparison(logs, capsys):
    paths = [logs[name][0] for name in ("florist", "fedit")]
    before = [digest(p) for p in paths]
    code, out, err = run_cli(capsys, ["report", *map(str, paths)])
    assert code == 0 and err == ""
    assert f"== {paths[0]} ==" in out and f"== {paths[1]} ==" in out
    assert "method florist, tau 0.9" in out and "method fedit" in out
    assert "LoRA ranks 4 ×1, 3 ×1, 2 ×2" in out  # a histogram: short for any number of clients
    assert "initial eval loss 4.5000" in out
    for loss in ("4.0000", "3.5000", "3.0000"):
        assert loss in out
    assert "3/4" in out  # round 1 aggregated 3 of 4 sampled clients
    assert "global rank per module and round" in out  # 3 modules: per-module table without --verbose
    assert "Comparison" in out
    comparison = out.split("Comparison", 1)[1]
    assert "florist" in comparison and "fedit" in comparison and "final loss" in comparison
    for phase in ("train", "gather", "aggregate", "broadcast", "merge", "eval"):
        assert phase in out
    assert [digest(p) for p in paths] == before


def test_report_many_modules_is_compact_unless_verbose(tmp_path, capsys):
    modules = [f"model.layers.{i}.self_attn.q_proj" for i in range(10)]
    path = tmp_path / "wide.h5"
    build_log(path, rounds=2, modules=modules, shapes=[(6, 5)] * 10, adapters=False, excluded={})
    code, out, _ = run_cli(capsys, ["report", str(path)])
    assert code == 0 and "per-module global ranks with --verbose" in out and "layers.9.self_attn.q_proj" not in out
    code, out, _ = run_cli(capsys, ["report", str(path), "--verbose"])
    assert code == 0 and "layers.9.self_attn.q_proj" in out


def test_report_csv_rows_match_the_log(logs, capsys):
    names = ("florist", "fedit")
    code, out, err = run_cli(capsys, ["report", *(str(logs[n][0]) for n in names), "--csv"])
    assert code == 0 and err == ""
    frame = pd.read_csv(io.StringIO(out))
    assert len(frame) == 6 and frame.columns[0] == "run"
    for name in names:
        path, written = logs[name]
        rows = frame[frame["run"] == str(path)].set_index("round")
        assert rows.index.tolist() == [0, 1, 2]
        assert rows["method"].unique().tolist() == [written["header"].method]
        for r, info in written["rounds"].items():
            assert rows.loc[r, "bytes_down"] == info["attrs"]["bytes_down"]
            assert rows.loc[r, "time_train"] == pytest.approx(info["attrs"]["time_train"])
            expected = info["attrs"]["eval_loss"]
            assert (
                math.isnan(rows.loc[r, "eval_loss"])
                if math.isnan(expected)
                else rows.loc[r, "eval_loss"] == pytest.approx(expected)
            )
            assert rows.loc[r, "mean_rank"] == pytest.approx(np.mean([info["global"][m][3] for m in MODULES]))


def test_report_json_is_a_complete_document_per_run(logs, capsys):
    names = ("fedit", "mmlu")
    code, out, err = run_cli(capsys, ["report", *(str(logs[n][0]) for n in names), "--json"])
    assert code == 0 and err == ""
    documents = json.loads(out)["runs"]
    assert [d["label"] for d in documents] == list(names)
    for name, document in zip(names, documents):
        path, written = logs[name]
        header = written["header"]
        assert document["run"] == str(path) and document["method"] == header.method
        assert (document["num_clients"], document["world_size"], document["initial_eval_loss"]) == (4, 2, 4.5)
        assert [m["name"] for m in document["modules"]] == MODULES
        assert [(m["out_features"], m["in_features"]) for m in document["modules"]] == SHAPES
        # the config is the logged one, as a plain dict
        assert document["config"] == ExperimentConfig.model_validate(yaml_tree(header.config_yaml)).model_dump(
            mode="json"
        )
        assert document["config"]["lora"]["ranks"] == CLIENT_RANKS
        rounds = document["rounds"]
        assert [row["round"] for row in rounds] == [0, 1, 2]
        for row, (r, info) in zip(rounds, written["rounds"].items()):
            assert row["global_rank"] == {m: info["global"][m][3] for m in MODULES}
            assert row["global_energy"] == pytest.approx({m: info["global"][m][4] for m in MODULES})
            assert row["bytes_down"] == info["attrs"]["bytes_down"]
            for key in ("eval_loss", "eval_accuracy"):
                expected = info["attrs"][key]
                assert row[key] is None if math.isnan(expected) else row[key] == pytest.approx(expected)
        totals = document["totals"]
        assert totals["rounds"] == 3
        assert totals["bytes_down"] == sum(w["attrs"]["bytes_down"] for w in written["rounds"].values())
        assert totals["time_train"] == pytest.approx(1.0 + 2.0 + 3.0)
        assert totals["time_total"] == pytest.approx(
            sum(sum(v for k, v in w["attrs"].items() if k.startswith("time_")) for w in written["rounds"].values())
        )
    fedit, mmlu = documents
    assert fedit["rounds"][1]["eval_loss"] is None and fedit["rounds"][2]["eval_loss"] == pytest.approx(
        3.0
    )  # every 2nd round
    assert fedit["summary"]["final_eval_accuracy"] is None and fedit["summary"]["best_eval_loss_round"] == 2
    assert [row["world_size"] for row in fedit["rounds"]] == [2, 2, 2]  # no per-round attribute: the header's
    assert [row["world_size"] for row in mmlu["rounds"]] == [1, 1, 2]
    assert mmlu["summary"]["world_sizes"] == [1, 2] and mmlu["summary"]["world_size"] == 2
    assert (mmlu["summary"]["final_eval_accuracy"], mmlu["summary"]["best_eval_accuracy"]) == (0.375, 0.5)
    assert mmlu["summary"]["best_eval_accuracy_round"] == 1 and mmlu["summary"]["final_eval_loss"] is None


def test_report_shows_accuracy_world_size_and_clients(logs, tmp_path, capsys):
    paths = [logs[name][0] for name in ("florist", "mmlu")]
    code, out, err = run_cli(capsys, ["report", *map(str, paths)])
    assert code == 0 and err == ""
    mmlu_block = out.split(f"== {paths[1]} ==", 1)[1].split("Comparison", 1)[0]
    assert "eval acc" in mmlu_block and "MPI ranks" in mmlu_block and "1→2 MPI rank(s)" in mmlu_block
    assert "final eval accuracy 0.3750 (round 2), best 0.5000 (round 1)" in mmlu_block
    table = out.split("Comparison", 1)[1].strip().splitlines()
    headers = table[0].split()
    for column in ("MPI", "clients", "per", "final", "acc"):
        assert column in headers
    rows = {line.split()[0]: line.split() for line in table[2:]}
    # run, method, tau, MPI ranks, clients, per round, rounds, final loss, best loss, final acc, best acc, ...
    assert rows["mmlu"][:11] == ["mmlu", "florist", "0.8", "1→2", "4", "4", "3", "-", "-", "0.3750", "0.5000"]
    assert rows["florist"][:11] == ["florist", "florist", "0.9", "2", "4", "4", "3", "3.0000", "3.0000", "-", "-"]

    code, out, _ = run_cli(capsys, ["report", *map(str, paths), "--csv"])
    frame = pd.read_csv(io.StringIO(out))
    mmlu = frame[frame["label"] == "mmlu"].set_index("round")
    assert mmlu["eval_accuracy"].tolist() == [0.25, 0.5, 0.375] and mmlu["eval_loss"].isna().all()
    assert mmlu["world_size"].tolist() == [1, 1, 2]
    assert frame[frame["label"] == "florist"]["world_size"].tolist() == [2, 2, 2]

    out_dir = tmp_path / "plots"
    code, _, err = run_cli(capsys, ["report", *map(str, paths), "--plots", str(out_dir), "--json"])
    assert code == 0
    names = {p.name for p in out_dir.iterdir()}
    assert {"eval_accuracy.png", "eval_accuracy_vs_downlink.png", "eval_loss.png", "eval_loss_vs_downlink.png"} <= names
    assert all((out_dir / n).read_bytes()[:8] == PNG_MAGIC for n in names)


def yaml_tree(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


def test_report_plots_are_png_files(logs, tmp_path, capsys):
    import matplotlib.image

    paths = [logs[name][0] for name in ("florist", "fedit")]
    before = [digest(p) for p in paths]
    out_dir = tmp_path / "plots"
    code, out, err = run_cli(capsys, ["report", *map(str, paths), "--plots", str(out_dir), "--csv"])
    assert code == 0
    assert "wrote" in err and pd.read_csv(io.StringIO(out))["run"].nunique() == 2  # stdout stays pure CSV
    expected = {"eval_loss.png", "eval_loss_vs_downlink.png"} | {
        f"{kind}_{name}.png" for kind in ("ranks", "spectrum", "phase_times") for name in ("florist", "fedit")
    }
    assert {p.name for p in out_dir.iterdir()} == expected
    for png in out_dir.iterdir():
        assert png.read_bytes()[:8] == PNG_MAGIC
        image = matplotlib.image.imread(png)
        assert image.shape[0] > 100 and image.shape[1] > 100
    assert [digest(p) for p in paths] == before


# ------------------------------------------------------------------ sweep-tau


def test_parse_taus():
    from florist_mpi.errors import UserError
    from florist_mpi.sweep import parse_taus

    taus = parse_taus("0.8:1.0:0.01")
    assert len(taus) == 21 and taus[0] == 0.8 and taus[-1] == 1.0 and taus[10] == pytest.approx(0.9)
    assert parse_taus("0.7:1.0:0.1") == [0.7, 0.8, 0.9, 1.0]
    assert parse_taus("0.1:0.35:0.1") == [0.1, 0.2, 0.3]
    assert parse_taus("0.8,0.9,1") == [0.8, 0.9, 1.0]
    assert parse_taus("0.9, 0.9,1") == [0.9, 1.0]
    for bad in ("1:0.5:0.1", "0.5:1:0", "0.5:1", "a,b", "0:1:0.5", "0.9:1.1:0.1", "", "nan"):
        with pytest.raises(UserError):
            parse_taus(bad)


def test_sweep_ranks_match_select_rank_on_dense_spectra(logs, tmp_path, capsys):
    path, written = logs["florist"]
    before = digest(path)
    taus = "0.3:1.0:0.05"
    out_dir = tmp_path / "sweep"
    code, out, err = run_cli(
        capsys, ["sweep-tau", str(path), "--round", "1", "--taus", taus, "--csv", "--out", str(out_dir)]
    )
    assert code == 0
    table = pd.read_csv(io.StringIO(out))
    assert table["tau"].iloc[-1] == 1.0 and len(table) == 15
    info = written["rounds"][1]
    weights = dict(zip(range(4), SAMPLES))
    spectra = {m: dense_spectrum(info["factors"], info["kept"], weights, m) for m in MODULES}
    for _, row in table.iterrows():
        expected = {m: select_rank(spectra[m], row["tau"]) for m in MODULES}
        for m in MODULES:
            assert row[f"rank:{m}"] == expected[m], (row["tau"], m)
        params = sum(expected[m] * (s[0] + s[1]) for m, s in zip(MODULES, SHAPES))
        assert row["total_rank"] == sum(expected.values())
        assert row["mean_rank"] == pytest.approx(sum(expected.values()) / len(MODULES))
        assert row["down_params_per_client"] == params
        assert row["down_bytes_per_client"] == 4 * params
        assert row["down_bytes_total"] == 4 * params * 4
        energies = [float((spectra[m][: expected[m]] ** 2).sum() / (spectra[m] ** 2).sum()) for m in MODULES]
        assert row["mean_energy"] == pytest.approx(np.mean(energies), abs=1e-9)
        assert row["mean_energy"] >= row["tau"] - 1e-9
    # at τ = 1 nothing is cut: every module keeps the full rank of Σ p_k B_k A_k (here Σ r_k of the kept clients)
    assert table.iloc[-1][[f"rank:{m}" for m in MODULES]].tolist() == [4 + 3 + 2] * len(MODULES)
    # the run's own τ reproduces its logged ranks
    logged = table[np.isclose(table["tau"], 0.9)].iloc[0]
    assert [logged[f"rank:{m}"] for m in MODULES] == [info["global"][m][3] for m in MODULES]

    saved = pd.read_csv(out_dir / "sweep.csv")
    pd.testing.assert_frame_equal(saved, table)
    assert (out_dir / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    assert "wrote" in err
    assert digest(path) == before


def test_sweep_table_output_and_default_folder(logs, capsys):
    path, written = logs["florist"]
    folder = path.with_name("florist_sweep_tau")
    assert not folder.exists()
    code, out, err = run_cli(capsys, ["sweep-tau", str(path), "--taus", "0.8,0.9,1", "--verbose"])
    assert code == 0 and err == ""
    assert "round 2" in out and "0.9 *" in out and "total rank" in out and "down params/client" in out
    assert "global rank per module and τ" in out and "layers.1.mlp.down_proj" in out
    # the sweep's downlink at the run's τ is printed beside the logged one (build_log logs the runner's formula)
    logged = written["rounds"][2]["attrs"]["bytes_down"]
    assert f"logged bytes_down of round 2 {logged / 1e3:.3f} kB ({logged} B): equal" in out
    # always written: beside the log by default
    assert sorted(p.name for p in folder.iterdir()) == ["sweep.csv", "sweep.json", "sweep.png"]
    table = pd.read_csv(folder / "sweep.csv")
    assert table["tau"].tolist() == [0.8, 0.9, 1.0]
    info = json.loads((folder / "sweep.json").read_text())
    assert info["logged_bytes_down"] == info["sweep_bytes_down_at_run_tau"] == logged
    assert (folder / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    # a second sweep does not overwrite the first
    before = {p.name: digest(p) for p in folder.iterdir()}
    code, out, err = run_cli(capsys, ["sweep-tau", str(path), "--taus", "0.5"])
    assert_one_line_error(code, err, str(folder), "not an empty directory", "--out")
    assert out == "" and {p.name: digest(p) for p in folder.iterdir()} == before


def test_sweep_refuses_used_out_paths(logs, tmp_path, capsys):
    path, _ = logs["florist"]
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    for target, fragment in ((used, "not an empty directory"), (a_file, "is a file")):
        code, out, err = run_cli(capsys, ["sweep-tau", str(path), "--out", str(target)])
        assert_one_line_error(code, err, str(target), fragment)
    assert (used / "keep.txt").read_text() == "mine" and a_file.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "used"]  # no scratch folder left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, ["sweep-tau", str(path), "--out", str(empty), "--csv"])
    assert code == 0 and (empty / "sweep.csv").is_file()


def test_negative_rounds_count_from_the_end(logs, tmp_path, capsys):
    path, _ = logs["florist"]
    tables = []
    for round_arg in ("-1", "2", "-3", "0"):
        code, out, _ = run_cli(
            capsys, ["sweep-tau", str(path), "--round", round_arg, "--csv", "--out", str(tmp_path / f"r{round_arg}")]
        )
        assert code == 0
        tables.append(pd.read_csv(io.StringIO(out)))
    pd.testing.assert_frame_equal(tables[0], tables[1])
    pd.testing.assert_frame_equal(tables[2], tables[3])
    assert not tables[0].equals(tables[2])
    code, out, err = run_cli(capsys, ["sweep-tau", str(path), "--round", "-4", "--out", str(tmp_path / "x")])
    assert_one_line_error(code, err, "round -4 is not in log", "-1 for the last")
    assert not (tmp_path / "x").exists()


def test_a_directory_given_as_the_log(tmp_path, capsys):
    for argv in (
        ["report", str(tmp_path)],
        ["sweep-tau", str(tmp_path)],
        ["export", str(tmp_path), "--out", str(tmp_path / "a")],
    ):
        code, out, err = run_cli(capsys, argv)
        assert_one_line_error(code, err, f"'{tmp_path}' is a directory, not a run log")
        assert out == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method, tau", [("flora", 0.9), ("ffa", 0.9), ("florist", 1.0)])
def test_sweep_without_client_adapters_uses_the_exact_global_update(tmp_path, capsys, method, tau):
    path = tmp_path / f"{method}.h5"
    written = build_log(path, method=method, tau=tau, adapters=False, seed=4)
    before = digest(path)
    code, out, err = run_cli(capsys, ["sweep-tau", str(path), "--round", "1", "--taus", "0.3:1.0:0.1", "--csv"])
    assert code == 0, err
    table = pd.read_csv(io.StringIO(out))
    info = written["rounds"][1]
    # the dense spectra of Σ p_k B_k A_k from the client factors the log does NOT hold
    spectra = {m: dense_spectrum(info["factors"], info["kept"], dict(zip(range(4), SAMPLES)), m) for m in MODULES}
    for _, row in table.iterrows():
        for m in MODULES:
            assert row[f"rank:{m}"] == select_rank(spectra[m], row["tau"]), (row["tau"], m)
    info_file = json.loads((tmp_path / f"{method}_sweep_tau" / "sweep.json").read_text())
    assert "exact" in info_file["source"] and "logged bytes_down of round 1" in err
    assert digest(path) == before


def test_sweep_refuses_a_global_update_that_is_not_exact(tmp_path, capsys):
    for method, tau in (("florist", 0.9), ("flexlora", 1.0)):
        path = tmp_path / f"{method}.h5"
        build_log(path, method=method, tau=tau, adapters=False)
        code, out, err = run_cli(capsys, ["sweep-tau", str(path)])
        assert_one_line_error(code, err, "no client adapters", method, "log.client_adapters: true")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "flexlora.h5",
        "flexlora.h5.rounds",
        "florist.h5",
        "florist.h5.rounds",
    ]


@pytest.mark.parametrize("name, tau", [("florist_tau1", 1.0), ("florist", 0.9)])
def test_sweep_reproduces_the_logged_global_update(logs, name, tau):
    from florist_mpi.sweep import sweep_global_factors

    path, written = logs[name]
    for r in (0, 1):
        ((got_tau, factors),) = list(sweep_global_factors(path, r, [tau]))
        assert got_tau == tau and list(factors) == MODULES
        for m in MODULES:
            B, A = factors[m]
            logged_B, logged_A = written["rounds"][r]["global"][m][:2]
            assert B.shape == logged_B.shape and A.shape == logged_A.shape
            got, want = B.astype(np.float64) @ A, logged_B.astype(np.float64) @ logged_A
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_sweep_global_factors_are_prefixes(logs):
    from florist_mpi.sweep import sweep_global_factors

    path, _ = logs["florist"]
    results = dict(sweep_global_factors(path, None, "0.5,0.8,1"))
    assert list(results) == [0.5, 0.8, 1.0]
    for m in MODULES:
        full_B, full_A = results[1.0][m]
        for tau in (0.5, 0.8):
            B, A = results[tau][m]
            assert B.shape[1] <= full_B.shape[1]
            np.testing.assert_array_equal(B, full_B[:, : B.shape[1]])
            np.testing.assert_array_equal(A, full_A[: A.shape[0]])
        assert results[0.5][m][0].shape[1] <= results[0.8][m][0].shape[1]
