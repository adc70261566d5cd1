"""federation.aggregation: sharded — owner assignment, the sharded exchange, and runs equal to root mode."""
from __future__ import annotations

import itertools
import sys

import h5py
import numpy as np
import pytest
from conftest import REPO, mpi_env, run_mpi

from florist_mpi.config import ConfigError, config_from_tree
from florist_mpi.methods import names
from florist_mpi.sharding import assign_owners, module_costs

# ------------------------------------------------------------------ owner assignment (no MPI)


def best_makespan(costs: list[float], size: int) -> float:
    return min(max(sum(c for c, r in zip(costs, assignment) if r == rank) for rank in range(size))
               for assignment in itertools.product(range(size), repeat=len(costs)))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("size", [2, 3])
def test_owner_assignment_is_deterministic_and_within_lpt_bound(seed, size):
    rng = np.random.default_rng(seed)
    costs = {f"layers.{i}.proj": float(c) for i, c in enumerate(rng.integers(1, 100, size=7))}
    owners = assign_owners(costs, size)
    assert list(owners) == list(costs) and set(owners.values()) <= set(range(size))
    assert assign_owners(dict(costs), size) == owners  # same inputs, same answer on every rank
    loads = [sum(c for name, c in costs.items() if owners[name] == rank) for rank in range(size)]
    optimum = best_makespan(list(costs.values()), size)
    assert max(loads) <= 4 / 3 * optimum + 1e-9  # Graham's bound for longest-processing-time
    # greedy by hand: the costliest module goes to rank 0, the second to rank 1
    ordered = sorted(costs, key=lambda n: (-costs[n], list(costs).index(n)))
    assert owners[ordered[0]] == 0 and owners[ordered[1]] == 1


def test_owner_assignment_spreads_costly_modules_and_handles_more_ranks_than_modules():
    shapes = {f"layers.{i}.{kind}": shape for i in range(4)
              for kind, shape in (("q_proj", (4096, 4096)), ("v_proj", (4096, 4096)), ("up_proj", (11008, 4096)))}
    costs = module_costs("florist", shapes, [16] * 256)
    assert all(costs["layers.0.up_proj"] > costs["layers.0.q_proj"] for _ in range(1))
    owners = assign_owners(costs, 4)
    ups = [owners[f"layers.{i}.up_proj"] for i in range(4)]
    assert sorted(ups) == [0, 1, 2, 3]  # the four costliest modules land on four different ranks
    loads = [sum(c for n, c in costs.items() if owners[n] == r) for r in range(4)]
    assert max(loads) / min(loads) < 1.2
    few = assign_owners({"a": 2.0, "b": 1.0}, 5)
    assert few == {"a": 0, "b": 1}


def test_aggregation_mode_is_validated():
    assert config_from_tree({}).federation.aggregation == "root"
    assert config_from_tree({"federation": {"aggregation": "sharded"}}).federation.aggregation == "sharded"
    with pytest.raises(ConfigError, match="federation.aggregation"):
        config_from_tree({"federation": {"aggregation": "everywhere"}})


# ------------------------------------------------------------------ the sharded exchange (MPI, no training)


@pytest.mark.mpi
@pytest.mark.parametrize("ranks, chunk, method", [(1, 1 << 28, "florist"), (3, 5, "florist"), (4, 1, "florist"),
                                                  (3, 7, "fedit"), (3, 7, "flora"), (2, 7, "flexlora"), (3, 7, "ffa"),
                                                  (3, 7, "fedex"), (2, 7, "hetlora")])
def test_sharded_exchange_equals_aggregating_in_one_place(ranks, chunk, method):
    env = mpi_env()
    env["FLORIST_MPI_CHUNK_ELEMENTS"] = str(chunk)
    env["METHOD"] = method
    result = run_mpi(ranks, [sys.executable, "-m", "mpi4py", str(REPO / "tests/mpi_scripts/sharding_check.py")],
                     env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(" ok") == ranks


def test_exchange_steps_keep_counts_and_displacements_within_int():
    from florist_mpi.comm import INT_MAX, STAGING_ELEMENTS, exchange_step_elements

    for size in (1, 3, 64, 4096, 100_000):
        step = exchange_step_elements(1 << 28, size)
        assert 1 <= step and step * size <= max(INT_MAX, size) and step * size <= max(STAGING_ELEMENTS, size)
    assert exchange_step_elements(5, 3) == 5


# ------------------------------------------------------------------ whole runs: sharded equals root


def logged(log) -> dict:
    """Everything a round records except timings: {(round, key): value}."""
    out = {}
    with h5py.File(log, "r") as handle:
        for r in sorted(handle["rounds"]):
            group = handle["rounds"][r]
            for key in ("bytes_up", "bytes_down", "tau"):
                out[(r, key)] = group.attrs[key]
            for key in ("id", "num_samples", "rank", "train_loss", "excluded", "excluded_reason"):
                out[(r, "clients", key)] = group["clients"][key][()].tolist()
            for module in group["global"]:
                node = group["global"][module]
                out[(r, module, "rank")] = int(node.attrs["rank"])
                out[(r, module, "energy")] = float(node.attrs["energy"])
                for key in ("B", "A", "singular_values", "residual_B", "residual_A"):  # residual: fedex only
                    if key in node:
                        out[(r, module, key)] = node[key][()]
            for client in group.get("client_adapters", {}):
                for module in group["client_adapters"][client]:
                    for key in "BA":
                        out[(r, "client", client, module, key)] = group["client_adapters"][client][module][key][()]
    return out


def assert_same_log(root_log, sharded_log):
    a, b = logged(root_log), logged(sharded_log)
    assert a.keys() == b.keys()
    assert any(key[1] == "client" for key in a)  # client adapters were logged and compared
    for key, want in a.items():
        got = b[key]
        if isinstance(want, np.ndarray) and want.dtype.kind == "f":
            scale = max(float(np.abs(want).max(initial=0.0)), 1e-30)
            assert got.shape == want.shape and float(np.abs(got - want).max(initial=0.0)) <= 1e-6 * scale, key
        elif isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-9, nan_ok=True), key
        elif isinstance(want, list):
            assert got == want or np.allclose(got, want, equal_nan=True), key
        else:
            assert got == want, key


# One non-finite and one failed client (neither drops out with seed 3: round 0 drops client 2,
# round 1 client 0), besides the simulated dropouts.
FAULTS = "nan@0:1,raise@1:3"


@pytest.mark.mpi
@pytest.mark.parametrize("method", names())
def test_sharded_run_equals_root_run(tmp_path, method):
    """3 ranks, 2 rounds, dropouts and faults; sharded with a tiny chunk so every collective steps."""
    from test_run import run_ok, write_config

    sections = {"federation": {"method": method, "dropout": 0.3}, "train": {"local_steps": 2}, "eval": {"every": 2}}
    logs = {}
    for mode in ("root", "sharded"):
        env = mpi_env()
        env["FLORIST_MPI_FAULT"] = FAULTS
        if mode == "sharded":
            env["FLORIST_MPI_CHUNK_ELEMENTS"] = "97"
        config, logs[mode] = write_config(tmp_path, f"{mode}.yaml", **{**sections, "federation": {
            **sections["federation"], "aggregation": mode}})
        run_ok(3, config, env=env)
    assert_same_log(logs["root"], logs["sharded"])
    with h5py.File(logs["sharded"], "r") as handle:
        reasons = [dict(zip(handle["rounds"][r]["clients/excluded"][()].tolist(),
                            (x.decode() for x in handle["rounds"][r]["clients/excluded_reason"][()])))
                   for r in ("00000", "00001")]
    assert "non-finite" in reasons[0][1] and "training failed" in reasons[1][3], reasons  # in both modes alike
    assert "dropout" in reasons[0][2] and "dropout" in reasons[1][0], reasons
