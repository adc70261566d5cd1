"""A method added from outside the package (tests/example_method.py) is picked up by the registry:
`aggregate`, config validation, the simulated clock's costs and the method list all see it."""

from __future__ import annotations

import pytest
import torch
from example_method import DenseFedAvg, register

from florist_mpi import methods, simclock
from florist_mpi.aggregation import aggregate, aggregate_adapter
from florist_mpi.config import ConfigError, config_from_tree


@pytest.fixture
def fedavg_dense():
    method = register()
    yield method
    methods.unregister(method.name)


def _clients(seed=0, ranks=(2, 3, 4), m=12, n=9):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64))
            for r in ranks]


def test_registered_method_aggregates_by_name(fedavg_dense):
    factors, weights = _clients(), [10, 30, 60]
    result = aggregate("fedavg_dense", factors, weights)
    # independent computation: the weighted dense mean, its best rank-4 approximation (Eckart–Young)
    mean = sum(w / 100 * B @ A for w, (B, A) in zip(weights, factors))
    U, S, Vh = torch.linalg.svd(mean)
    want = (U[:, :4] * S[:4]) @ Vh[:4]
    assert result.rank == 4 and result.method == "fedavg_dense"
    torch.testing.assert_close(result.B @ result.A, want, rtol=1e-10, atol=1e-10)
    assert set(aggregate_adapter("fedavg_dense", {"q": factors}, weights)) == {"q"}


def test_registered_method_passes_config_validation(fedavg_dense):
    assert "fedavg_dense" in methods.names()
    cfg = config_from_tree({"federation": {"method": "fedavg_dense"}})
    assert methods.get(cfg.federation.method) is fedavg_dense
    # the defaults every Method inherits: both factors travel, the global rank is sent whole
    shapes = {"q": (12, 9)}
    assert simclock.download_bytes("fedavg_dense", shapes, {"q": 4}, client_rank=2) == 4 * 4 * (12 + 9)
    assert simclock.aggregation_flops("fedavg_dense", shapes, [2, 3, 4], {"q": 4}) == pytest.approx(
        2 * 12 * 9 * 9 + 6 * 12 * 81 + 20 * 729
    )


def test_unregistered_name_is_refused_everywhere():
    assert "fedavg_dense" not in methods.names()  # the fixture removed it
    with pytest.raises(ConfigError, match="federation.method"):
        config_from_tree({"federation": {"method": "fedavg_dense"}})
    with pytest.raises(ValueError, match="unknown method 'fedavg_dense'"):
        aggregate("fedavg_dense", _clients(), [1, 1, 1])


def test_a_name_is_registered_once(fedavg_dense):
    with pytest.raises(ValueError, match="already registered"):
        methods.register(DenseFedAvg())
