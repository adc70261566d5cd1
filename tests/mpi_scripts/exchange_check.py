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


# Rank k hosts clients k, k+size, ... with ranks 1 + id % 3; client 4 fails.
mine = []
for cid in range(world.rank, 7, world.size):
    if cid == 4:
        mine.append(ClientUpdate(cid, 10 + cid, 1 + cid % 3, float("nan"), error="boom"))
    else:
        mine.append(ClientUpdate(cid, 10 + cid, 1 + cid % 3, 0.5 * cid, factors_for(cid, 1 + cid % 3)))
received = exchange.gather_updates(world, mine, shapes)
if world.is_root:
    assert [c.client_id for c in received] == list(range(7)), [c.client_id for c in received]
    for c in received:
        assert c.num_samples == 10 + c.client_id and c.rank == 1 + c.client_id % 3
        if c.client_id == 4:
            assert c.failed and not c.factors
            continue
        expected = factors_for(c.client_id, c.rank)
        for name in shapes:
            assert np.array_equal(c.factors[name][0], expected[name][0])
            assert np.array_equal(c.factors[name][1], expected[name][1])

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
