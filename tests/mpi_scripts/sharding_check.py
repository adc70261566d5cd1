"""Run under mpiexec: sharded exchange + aggregation equals aggregating everything in one place."""
import math
import os

import numpy as np
import torch

from florist_mpi import comm, sharding
from florist_mpi.aggregation import aggregate_adapter
from florist_mpi.exchange import REASON_FAILED, REASON_NONFINITE, ClientUpdate

world = comm.init_world()
method = os.environ.get("METHOD", "florist")
shapes = {"layer.0.q": (6, 5), "layer.0.v": (4, 5), "layer.0.down": (9, 3)}
CLIENTS, FAILED, NONFINITE, DROPPED = 8, 4, 5, 6
rank_of = lambda cid: 1 + cid % 3  # noqa: E731
shared_A = np.random.default_rng(99).standard_normal((3, 9)).astype(np.float32)


def factors_for(client_id):
    g = np.random.default_rng(client_id)
    r = rank_of(client_id)
    out = {}
    for name, (m, n) in shapes.items():
        A = shared_A[:r, :n].copy() if method == "ffa" else g.standard_normal((r, n)).astype(np.float32)
        out[name] = (g.standard_normal((m, r)).astype(np.float32), A)
    if client_id == NONFINITE:
        out["layer.0.down"][0][1, 0] = np.nan  # one entry of one module
    return out


# Rank k hosts clients k, k+size, ... (client 6 dropped out before training).
updates = []
for cid in range(world.rank, CLIENTS, world.size):
    if cid == DROPPED:
        continue
    if cid == FAILED:
        updates.append(ClientUpdate(cid, 10 + cid, rank_of(cid), math.nan, error="boom"))
    else:
        updates.append(ClientUpdate(cid, 10 + cid, rank_of(cid), 0.5 * cid, factors_for(cid)))

state = sharding.sharded_round(world, updates, shapes, [(DROPPED, "dropout")], method=method, tau=0.8, max_rank=None)
kept = [c for c in range(CLIENTS) if c not in (FAILED, NONFINITE, DROPPED)]
assert [c.client_id for c in state.kept] == kept, [c.client_id for c in state.kept]
assert state.excluded == [(FAILED, REASON_FAILED), (NONFINITE, REASON_NONFINITE), (DROPPED, "dropout")], state.excluded
assert [c.client_id for c in state.clients] == [c for c in range(CLIENTS) if c != DROPPED]
assert sorted(state.owned) == sorted(n for n in shapes if state.owners[n] == world.rank)

# The reference: every kept client's factors in one place, aggregated with the same call.
reference = aggregate_adapter(
    method, {name: [tuple(map(torch.from_numpy, factors_for(c)[name])) for c in kept] for name in shapes},
    [10 + c for c in kept], tau=0.8)
for name in shapes:
    got, want = state.results[name], reference[name]
    assert got.rank == want.rank, (name, got.rank, want.rank)
    assert np.array_equal(state.global_factors[name][0], want.B.float().numpy()), name
    assert np.array_equal(state.global_factors[name][1], want.A.float().numpy()), name
    assert np.array_equal(got.singular_values.numpy(), want.singular_values.double().numpy()), name
    assert got.energy == want.energy
    if want.residual is not None:  # fedex: the residual factors travel with the global ones
        for got_factor, want_factor in zip(state.residuals[name], want.residual):
            assert np.array_equal(got_factor, want_factor.float().numpy()), name
        assert all(torch.equal(g, w.float()) for g, w in zip(got.residual, want.residual)), name

if world.is_root:
    streamed = list(sharding.stream_client_adapters(world, state, shapes))
    assert [name for name, _ in streamed] == list(shapes)
    for name, pairs in streamed:
        assert list(pairs) == kept
        for c, (B, A) in pairs.items():
            assert np.array_equal(B, factors_for(c)[name][0]) and np.array_equal(A, factors_for(c)[name][1])
else:
    sharding.send_client_adapters(world, state, shapes)
print(f"rank {world.rank} ok", flush=True)
