"""`florist-mpi compare-methods` on synthetic logs (test_analysis.build_log), checked against numpy.

ΔW = Σ p_k B_k A_k and every method's global update are formed densely in float64 numpy from the
logged client factors; the bytes are counted from the shapes and ranks; the FLOPs from the cost
formulas of docs/simulated-clock.md. One real run (marked mpi) checks --eval.
"""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from test_analysis import CLIENT_RANKS, MODULES, SAMPLES, SHAPES, build_log

from florist_mpi import cli, methods
from florist_mpi.aggregation import aggregate
from florist_mpi.update_distance import ExactUpdate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TAUS = [0.8, 0.9, 0.95, 1.0]
ROUND = 1  # build_log excludes client 2 in round 1: 3 aggregated clients of ranks 4, 3, 2


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    base = tmp_path_factory.mktemp("compare")
    made = {}
    for name, kwargs in {
        "florist": {"rounds": 2},
        "ffa": {"method": "ffa", "tau": 1.0, "rounds": 2, "seed": 4},
        "no_adapters": {"rounds": 2, "adapters": False},
    }.items():
        path = base / f"{name}.h5"
        made[name] = (path, build_log(path, **kwargs))
    return made


def run_cli(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def compare_json(capsys, path, *extra) -> dict:
    code, out, err = run_cli(capsys, ["compare-methods", str(path), "--json", *extra])
    assert code == 0, err
    return json.loads(out)


def rows_of(document) -> dict:
    return {(row["method"], row["tau"]): row for row in document["methods"]}


def dense_delta(written, module) -> np.ndarray:
    kept = written["kept"]
    p = np.array([SAMPLES[c] for c in kept], dtype=np.float64)
    p /= p.sum()
    factors = written["factors"]
    return sum(pk * factors[c][module][0].astype(np.float64) @ factors[c][module][1].astype(np.float64)
               for pk, c in zip(p, kept))


def relative(errors_by_module, deltas) -> float:
    return math.sqrt(sum(e**2 for e in errors_by_module.values()) / sum(np.sum(d**2) for d in deltas.values()))


# ------------------------------------------------------------------ the numbers


def test_exact_methods_reproduce_delta_and_fedit_does_not(logs, capsys):
    path, _ = logs["florist"]
    document = compare_json(capsys, path, "--round", str(ROUND))
    rows = rows_of(document)
    assert document["round"] == ROUND and document["taus"] == TAUS
    assert [c["id"] for c in document["clients"]] == [0, 1, 3]
    expected = [(name, tau) for name in methods.names()
                for tau in (TAUS if methods.get(name).uses_tau else [None])]
    assert list(rows) == expected  # every registered method, FLoRIST once per τ, in registry order
    assert rows[("florist", 1.0)]["relative_error"] <= 1e-5
    assert rows[("flora", None)]["relative_error"] <= 1e-5
    if "fedex" in rows:  # once FedEx is registered: exact through its residual
        assert rows[("fedex", None)]["relative_error"] <= 1e-5
    assert rows[("fedit", None)]["relative_error"] > 1e-2  # heterogeneous ranks, several clients
    errors = [rows[("florist", tau)]["relative_error"] for tau in TAUS]
    assert errors == sorted(errors, reverse=True) and errors[0] > 1e-2


def test_errors_match_dense_numpy(logs, capsys):
    """Every row's error against ΔW and the global update formed densely; FLoRIST and FlexLoRA also
    against the truncated SVD of ΔW, FedIT against the product of the averaged (zero-padded) factors."""
    path, written = logs["florist"]
    document = compare_json(capsys, path, "--round", str(ROUND))
    rows = rows_of(document)
    this_round = written["rounds"][ROUND]
    kept = this_round["kept"]
    deltas = {m: dense_delta(this_round, m) for m in MODULES}
    assert document["delta_norm"] == pytest.approx(math.sqrt(sum(np.sum(d**2) for d in deltas.values())), rel=1e-10)
    weights = [SAMPLES[c] for c in kept]
    for (name, tau), row in rows.items():
        if row["note"] is not None:
            continue
        # generic: the method's own aggregate, its global update (with any residual) formed densely
        errors = {}
        for m in MODULES:
            pairs = [tuple(torch.from_numpy(f) for f in this_round["factors"][c][m]) for c in kept]
            result = aggregate(name, pairs, weights, tau=tau or 1.0)
            G = result.B.double().numpy() @ result.A.double().numpy()
            residual = getattr(result, "residual", None)
            if residual is not None:
                G = G + residual[0].double().numpy() @ residual[1].double().numpy()
            errors[m] = np.linalg.norm(G - deltas[m])
            assert row["module_errors"][m] == pytest.approx(errors[m] / np.linalg.norm(deltas[m]), rel=1e-6, abs=1e-7)
            assert row["global_rank"][m] == result.rank
        assert row["relative_error"] == pytest.approx(relative(errors, deltas), rel=1e-6, abs=1e-7), name

    p = np.array(weights, dtype=np.float64) / sum(weights)
    ranks = [CLIENT_RANKS[c] for c in kept]
    fedit = {}
    for m in MODULES:
        width = max(ranks)
        B = sum(pk * np.pad(this_round["factors"][c][m][0].astype(np.float64), ((0, 0), (0, width - r)))
                for pk, c, r in zip(p, kept, ranks))
        A = sum(pk * np.pad(this_round["factors"][c][m][1].astype(np.float64), ((0, width - r), (0, 0)))
                for pk, c, r in zip(p, kept, ranks))
        fedit[m] = np.linalg.norm(B @ A - deltas[m])
    assert rows[("fedit", None)]["relative_error"] == pytest.approx(relative(fedit, deltas), rel=1e-5)

    spectra = {m: np.linalg.svd(deltas[m], compute_uv=False) for m in MODULES}
    for tau in (0.8, 0.9, 0.95):
        row = rows[("florist", tau)]
        tails = {}
        for m in MODULES:
            energy = np.cumsum(spectra[m] ** 2) / np.sum(spectra[m] ** 2)
            r = int(np.searchsorted(energy, tau - 1e-12)) + 1  # the smallest rank keeping τ of the energy
            assert row["global_rank"][m] == r, (tau, m)
            tails[m] = math.sqrt(np.sum(spectra[m][r:] ** 2))
        assert row["relative_error"] == pytest.approx(relative(tails, deltas), rel=1e-5)

    flex = rows[("flexlora", None)]
    tails = {m: math.sqrt(np.sum(spectra[m][max(ranks):] ** 2)) for m in MODULES}
    assert flex["relative_error"] == pytest.approx(relative(tails, deltas), rel=1e-5)
    assert set(flex["client_truncation_errors"]) == {str(c) for c in kept}
    for c, r in zip(kept, ranks):
        tail = {m: math.sqrt(np.sum(spectra[m][r:] ** 2)) for m in MODULES}
        assert flex["client_truncation_errors"][str(c)] == pytest.approx(relative(tail, deltas), rel=1e-5)
    assert rows[("fedit", None)]["client_truncation_errors"] is None


def test_bytes_and_flops_match_an_independent_count(logs, capsys):
    path, written = logs["florist"]
    document = compare_json(capsys, path, "--round", str(ROUND))
    rows = rows_of(document)
    kept = written["rounds"][ROUND]["kept"]
    ranks = [CLIENT_RANKS[c] for c in kept]
    everyone = CLIENT_RANKS  # every registered client downloads
    up = 4 * sum(r * (m + n) for r in ranks for m, n in SHAPES)
    for name in ("florist", "fedit", "flora", "flexlora"):
        for row in document["methods"]:
            if row["method"] == name:
                assert row["bytes_up"] == up, name
    for tau in TAUS:
        row = rows[("florist", tau)]
        assert row["bytes_down"] == 4 * len(everyone) * sum(
            row["global_rank"][mod] * (m + n) for mod, (m, n) in zip(MODULES, SHAPES)
        )
    assert rows[("florist", 0.9)]["bytes_down"] == document["logged_bytes_down"]  # the run's own τ, as logged
    assert rows[("florist", 0.9)]["bytes_up"] == document["logged_bytes_up"]
    assert rows[("fedit", None)]["bytes_down"] == 4 * len(everyone) * max(ranks) * sum(m + n for m, n in SHAPES)
    assert rows[("flora", None)]["bytes_down"] == 4 * len(everyone) * sum(ranks) * sum(m + n for m, n in SHAPES)
    flex_width = max(ranks)
    assert rows[("flexlora", None)]["bytes_down"] == 4 * sum(
        min(flex_width, r) * (m + n) for r in everyone for m, n in SHAPES
    )
    R = sum(ranks)
    assert rows[("fedit", None)]["server_flops"] == pytest.approx(sum(2 * R * (m + n) for m, n in SHAPES))
    assert rows[("flora", None)]["server_flops"] == pytest.approx(sum(R * (m + n) for m, n in SHAPES))
    assert rows[("flexlora", None)]["server_flops"] == pytest.approx(sum(
        2 * m * n * R + 6 * max(m, n) * min(m, n) ** 2 + 20 * min(m, n) ** 3 for m, n in SHAPES
    ))


def test_ffa_row_on_its_own_log_and_a_note_on_another(logs, capsys):
    path, written = logs["ffa"]
    document = compare_json(capsys, path, "--round", "0")
    ffa = rows_of(document)[("ffa", None)]
    assert ffa["note"] is None and ffa["relative_error"] <= 1e-5  # B averaged on the shared A: exact
    ranks = CLIENT_RANKS  # no exclusion in round 0
    assert ffa["bytes_up"] == 4 * sum(r * m for r in ranks for m, _ in SHAPES)  # only B travels
    assert ffa["bytes_down"] == 4 * len(ranks) * max(ranks) * sum(m for m, _ in SHAPES)

    path, _ = logs["florist"]
    document = compare_json(capsys, path)
    ffa = rows_of(document)[("ffa", None)]
    assert ffa["relative_error"] is None and ffa["bytes_down"] is None
    assert "not applicable" in ffa["note"] and "shared frozen A" in ffa["note"]


def test_exact_update_distances_match_dense_numpy():
    g = torch.Generator().manual_seed(5)
    for m, n, ranks, width in [(12, 10, [4, 3, 2], 6), (5, 30, [4, 4], 7), (40, 7, [8, 2], 3)]:
        pairs = [(torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)) for r in ranks]
        p = np.arange(1.0, len(ranks) + 1) / np.arange(1.0, len(ranks) + 1).sum()
        delta = sum(pk * B.double().numpy() @ A.double().numpy() for pk, (B, A) in zip(p, pairs))
        exact = ExactUpdate(pairs, p)
        assert exact.norm == pytest.approx(np.linalg.norm(delta), rel=1e-12)
        B, A = torch.randn(m, width, generator=g), torch.randn(width, n, generator=g)
        full, prefixes = exact.distances(B, A, [0, 1, width])
        Bn, An = B.double().numpy(), A.double().numpy()
        assert full == pytest.approx(np.linalg.norm(Bn @ An - delta), rel=1e-10)
        for r, value in prefixes.items():
            assert value == pytest.approx(np.linalg.norm(Bn[:, :r] @ An[:r] - delta), rel=1e-10)
        assert exact.distances(torch.zeros(m, 0), torch.zeros(0, n))[0] == pytest.approx(np.linalg.norm(delta))


class AveragedWithResidual(methods.Method):
    """A method registered from outside, with FedEx-LoRA's shape of result: FedIT's averaged factors plus
    a `residual` (low-rank factors of ΔW − B̄Ā: [B_s, −B̄][p-scaled A_s; Ā]) and a downlink hook."""

    name = "test_residual"

    def aggregate(self, stack, p, *, tau, max_rank, route, out_dtype):
        from florist_mpi import lowrank

        result = lowrank.fedit(stack, p, out_dtype)
        B_bar, A_bar = result.B.double(), result.A.double()
        scaled_A = stack.per_column(p)[:, None] * stack.A.double()
        result.residual = (torch.cat([stack.B.double(), -B_bar], dim=1).to(out_dtype),
                           torch.cat([scaled_A, A_bar], dim=0).to(out_dtype))
        return result

    def plan(self, m, n, K, R, r_max, r_g):
        from florist_mpi import costmodel

        return costmodel.RoutePlan("average", 2.0 * R * (m + n))

    def downlink_floats(self, global_rank, client_rank, m, n, residual_rank=0):
        return (global_rank + residual_rank) * (m + n) + 1  # +1: tells the hook's count from the fallback's


class ResidualWithoutHook(AveragedWithResidual):
    name = "test_residual_plain"
    downlink_floats = None  # the fallback: wire_floats at download_rank, plus the residual's


@pytest.fixture
def residual_methods():
    registered = [methods.register(AveragedWithResidual()), methods.register(ResidualWithoutHook())]
    yield registered
    for method in registered:
        methods.unregister(method.name)


def test_a_method_with_a_residual_and_a_downlink_hook(logs, capsys, residual_methods):
    """A registered method appears with no change to the command; its residual is part of the global
    update (exact here), its rank is reported, and its downlink comes from the hook where it has one."""
    path, written = logs["florist"]
    document = compare_json(capsys, path, "--round", str(ROUND))
    rows = rows_of(document)
    kept = written["rounds"][ROUND]["kept"]
    ranks = [CLIENT_RANKS[c] for c in kept]
    residual_rank = sum(ranks) + max(ranks)
    for name in ("test_residual", "test_residual_plain"):
        row = rows[(name, None)]
        assert row["relative_error"] <= 1e-5, name
        assert row["residual_rank"] == {m: residual_rank for m in MODULES}
        assert row["global_rank"] == {m: max(ranks) for m in MODULES}
    floats = sum((max(ranks) + residual_rank) * (m + n) for m, n in SHAPES)
    assert rows[("test_residual", None)]["bytes_down"] == 4 * len(CLIENT_RANKS) * (floats + len(SHAPES))
    assert rows[("test_residual_plain", None)]["bytes_down"] == 4 * len(CLIENT_RANKS) * floats
    assert rows[("fedit", None)]["relative_error"] > 1e-2  # the same B̄Ā without its residual
    code, out, err = run_cli(capsys, ["compare-methods", str(path), "--round", str(ROUND)])
    assert code == 0 and "residual rank" in out.splitlines()[1]


# ------------------------------------------------------------------ the command


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(code, err, *fragments):
    assert code != 0 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("florist-mpi: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_bad_requests_fail_in_one_line_and_leave_the_log(logs, capsys, tmp_path):
    path, _ = logs["florist"]
    bare, _ = logs["no_adapters"]
    before = digest(path), digest(bare)
    code, out, err = run_cli(capsys, ["compare-methods", str(bare)])
    assert_one_line_error(code, err, "no client adapters", "--set log.client_adapters=true")
    code, out, err = run_cli(capsys, ["compare-methods", str(path), "--round", "7"])
    assert_one_line_error(code, err, "round 7 is not in log")
    code, out, err = run_cli(capsys, ["compare-methods", str(path), "--taus", "0.9,1.5"])
    assert_one_line_error(code, err, "(0, 1]")
    afile = tmp_path / "file"
    afile.write_text("x")
    code, out, err = run_cli(capsys, ["compare-methods", str(path), "--plots", str(afile)])
    assert_one_line_error(code, err, "not a directory")
    assert (digest(path), digest(bare)) == before and out == ""


def test_table_and_plots(logs, capsys, tmp_path):
    path, _ = logs["florist"]
    plots = tmp_path / "plots"
    code, out, err = run_cli(capsys, ["compare-methods", str(path), "--taus", "0.9,1", "--plots", str(plots)])
    assert code == 0, err
    lines = out.splitlines()
    table_rows = [line for line in lines if line.split()[:1] and line.split()[0] in methods.names()]
    expected = sum(2 if methods.get(name).uses_tau else 1 for name in methods.names())
    assert len(table_rows) == expected
    assert "down kB" in lines[1] and "up kB" in lines[1]  # one byte unit for the table
    assert (plots / "compare_methods.png").read_bytes()[:8] == PNG_MAGIC
    assert f"wrote {plots / 'compare_methods.png'}" in out
    # with --json stdout stays one JSON object; the plot message goes to stderr
    code, out, err = run_cli(capsys, ["compare-methods", str(path), "--json", "--plots", str(plots)])
    assert code == 0 and json.loads(out)["methods"] and "compare_methods.png" in err


# ------------------------------------------------------------------ --eval on a real run


@pytest.mark.mpi
def test_eval_at_the_runs_tau_reproduces_the_logged_eval_loss(tmp_path, capsys):
    import h5py
    from test_run import run_ok, write_config

    config, log = write_config(tmp_path, "florist.yaml", run={"rounds": 2, "seed": 3})
    run_ok(1, config)
    document = compare_json(capsys, log, "--round", "1", "--taus", "0.95,1", "--eval", "--device", "cpu")
    rows = rows_of(document)
    with h5py.File(log, "r") as handle:
        logged = float(handle["rounds/00001"].attrs["eval_loss"])
    assert rows[("florist", 0.95)]["eval_loss"] == pytest.approx(logged, rel=1e-4)  # the run's own τ
    # the exact methods give the same model to float32 rounding; FedIT another one
    assert rows[("flora", None)]["eval_loss"] == pytest.approx(rows[("florist", 1.0)]["eval_loss"], rel=1e-5)
    assert all(row["eval_loss"] is not None for row in document["methods"] if row["note"] is None)
