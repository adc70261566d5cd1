"""Run under mpiexec: comm.TRAFFIC counts each collective's logical bytes, as documented."""
import numpy as np

from florist_mpi import comm

world = comm.init_world()
size, rank = world.size, world.rank


def delta(action):
    before = (comm.TRAFFIC.sent, comm.TRAFFIC.received)
    action()
    return comm.TRAFFIC.sent - before[0], comm.TRAFFIC.received - before[1]


# a broadcast of 1000 floats (plus its 8-byte length): n per receiver at the root, n at each receiver
payload = np.arange(1000, dtype=np.float32) if world.is_root else None
sent, received = delta(lambda: comm.bcast_float32(world, payload))
n = 8 + 4000
assert (sent, received) == ((n * (size - 1), 0) if world.is_root else (0, n)), (rank, sent, received)

# a gather of (rank + 1) * 10 floats: each sends its own, rank 0 receives the others' (plus counts)
local = np.full((rank + 1) * 10, rank, dtype=np.float32)
sent, received = delta(lambda: comm.gather_float32(world, local))
others = sum((r + 1) * 10 * 4 for r in range(1, size))
count_bytes = 8  # each rank's int64 count; the int64 step count is all-reduced (8 each way)
if size == 1:
    assert (sent, received) == (0, 0), (sent, received)  # a world of one moves nothing
elif world.is_root:
    assert (sent, received) == (8, 8 + count_bytes * (size - 1) + others), (rank, sent, received)
else:
    assert (sent, received) == (8 + count_bytes + local.nbytes, 8), (rank, sent, received)

# an all-reduce of 3 doubles: 24 bytes each way
assert delta(lambda: comm.allreduce_sum(world, np.ones(3))) == ((24, 24) if size > 1 else (0, 0))
print(f"rank {rank} ok", flush=True)
