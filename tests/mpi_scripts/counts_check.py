"""Run under mpiexec: gather_counts counts each candidate on exactly one rank and every rank gets all."""
from florist_mpi import comm
from florist_mpi.clients import gather_counts

world = comm.init_world()
candidates = [0, 2, 3, 5, 8, 9, 11]
counted = []


def count(client):
    counted.append(client)
    return 1000 * client + 7


result = gather_counts(world, candidates, count)
assert result == {c: 1000 * c + 7 for c in candidates}, result
assert counted == candidates[world.rank :: world.size], counted
shares = world.comm.allgather(counted)
assert sorted(c for share in shares for c in share) == candidates, shares
print(f"rank {world.rank} ok")
