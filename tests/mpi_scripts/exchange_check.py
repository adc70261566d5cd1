"""Run under mpiexec: the buffer collectives are exact, also when split into many chunks."""
import os
import sys

import numpy as np

from florist_mpi import comm, exchange
from florist_mpi.exchange import ClientUpdate

world = comm.init_world()
shapes = {"layer.0.q": (6, 5), "layer.0.v": (4, 5)}


def factors_for(client_id, r):
    g = np.random.default_rng(client_id)
    return {name: (g.standard_normal((m, r)).astype(np.float32), g.standard_normal((r, n)).astype(np.float32))
            for name, (m, n) in shapes.items()}


# Rank k hosts clients k, k+size, ... with ranks 1 + id % 3; client 4 fails, client 5 sends a NaN.
mine = []
for cid in range(world.rank, 8, world.size):
    if cid == 4:
        mine.append(ClientUpdate(cid, 10 + cid, 1 + cid % 3, float("nan"), error="boom"))
    else:
        factors = factors_for(cid, 1 + cid % 3)
        if cid == 5:
            factors["layer.0.v"][1][0, 2] = np.nan
        mine.append(ClientUpdate(cid, 10 + cid, 1 + cid % 3, 0.5 * cid, factors))
gathered = exchange.gather_updates(world, mine, shapes)
if world.is_root:
    received, stacks = gathered
    assert [c.client_id for c in received] == list(range(8)), [c.client_id for c in received]
    status = {c.client_id: c.status for c in received}
    assert status[4] == exchange.STATUS_FAILED and status[5] == exchange.STATUS_NONFINITE
    assert all(status[c] == exchange.STATUS_OK for c in range(8) if c not in (4, 5))
    kept = [c for c in range(8) if c not in (4, 5)]
    assert [c.client_id for c in stacks.clients] == kept
    for c in received:
        assert c.num_samples == 10 + c.client_id and c.rank == 1 + c.client_id % 3
    for name, (m, n) in shapes.items():
        # the stacks, built independently: B_k^T rows and A_k rows, client after client by id
        Bt, A = stacks.modules[name]
        expected_Bt = np.concatenate([factors_for(c, 1 + c % 3)[name][0].T for c in kept])
        expected_A = np.concatenate([factors_for(c, 1 + c % 3)[name][1] for c in kept])
        assert np.array_equal(Bt, expected_Bt) and np.array_equal(A, expected_A), name
        for cid, (B, A_k) in stacks.client_factors(name).items():
            want = factors_for(cid, 1 + cid % 3)[name]
            assert np.array_equal(B, want[0]) and np.array_equal(A_k, want[1])

# Raw chunked gather of unequal sizes (some ranks send nothing).
local = np.arange(world.rank * 1000, world.rank * 1000 + 37 * world.rank, dtype=np.float32)
parts = comm.gather_float32(world, local, chunk=int(os.environ.get("CHUNK", "5")))
if world.is_root:
    for rank, part in enumerate(parts):
        assert np.array_equal(part, np.arange(rank * 1000, rank * 1000 + 37 * rank, dtype=np.float32))

glob = {name: (np.full((m, 3), 2.0, np.float32), np.full((3, n), 0.5, np.float32)) for name, (m, n) in shapes.items()}
got = exchange.broadcast_global(world, glob if world.is_root else None, shapes)
for name in shapes:
    assert np.array_equal(got[name][0], glob[name][0]) and np.array_equal(got[name][1], glob[name][1])

text = comm.bcast_bytes(world, b"hello" if world.is_root else None)
assert text == b"hello"
print(f"rank {world.rank} ok", flush=True)
sys.stdout.flush()
