"""MPI communication: who am I, and moving factor buffers between ranks.

Only contiguous NumPy buffers cross the wire (no pickled tensors). Large payloads
are sent in chunks so that no single call exceeds MPI's int-sized counts and
displacements, which keeps the exchange correct past 2 GiB.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# Elements per collective call; int32-safe for counts and displacements.
DEFAULT_CHUNK_ELEMENTS = 1 << 28  # 1 GiB of fp32
# All-to-all and all-gather steps stage at most this many elements in all (64 MiB of fp32),
# so the staging buffers stay small next to the factors they move.
STAGING_ELEMENTS = 1 << 24
INT_MAX = 2**31 - 1
CHUNK_ENV = "FLORIST_MPI_CHUNK_ELEMENTS"


def _mpi():
    from mpi4py import MPI

    return MPI


def chunk_elements() -> int:
    value = os.environ.get(CHUNK_ENV)
    return max(1, int(value)) if value else DEFAULT_CHUNK_ELEMENTS


@dataclass
class Traffic:
    """Bytes this process's collectives moved to and from other ranks, counted by the logical pattern
    of each call (a broadcast: n sent per receiving rank at the root, n received at each other rank;
    an all-reduce: n sent and n received; a gather: n sent, Σ n received at the root; an all-to-all
    or all-gather: what goes to and comes from other ranks). The MPI library's algorithms (trees,
    rings) and transport may move more or less on the wire; a world of one moves nothing."""

    sent: int = 0
    received: int = 0


TRAFFIC = Traffic()


def _tally(world: "World", sent: int = 0, received: int = 0) -> None:
    if world.size > 1:
        TRAFFIC.sent += int(sent)
        TRAFFIC.received += int(received)


@dataclass
class World:
    """The job's ranks as seen from this process."""

    comm: object
    rank: int
    size: int
    local_rank: int
    local_size: int
    node_comm: object

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        self.comm.Barrier()

    def node_barrier(self) -> None:
        self.node_comm.Barrier()


def init_world() -> World:
    """Join the MPI job (a single process without a launcher is a world of one)."""
    MPI = _mpi()
    comm = MPI.COMM_WORLD
    # A shared-memory split groups the ranks of one node under srun and mpirun alike, and
    # numbers them 0..k-1 whatever the launcher's own variables say (they can be stale:
    # SLURM_LOCALID survives into an mpirun started inside an allocation).
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    return World(
        comm=comm,
        rank=comm.Get_rank(),
        size=comm.Get_size(),
        local_rank=node_comm.Get_rank(),
        local_size=node_comm.Get_size(),
        node_comm=node_comm,
    )


# Task counts a launcher puts in each process's environment, most specific first: the
# MPI library's own launcher (Open MPI's mpirun/prterun; PMI_SIZE: MPICH/Intel MPI's
# hydra and srun --mpi=pmi2), then Slurm's step. SLURM_NTASKS is left out on purpose: the
# batch script of `sbatch --ntasks=4` has it too, where one plain process is normal;
# SLURM_STEP_NUM_TASKS exists only in tasks that srun started.
LAUNCHER_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS")


@dataclass(frozen=True)
class LaunchSize:
    """How many tasks the launcher says it started, and which variable said so."""

    tasks: int
    variable: str


def launcher_size(environ: Mapping[str, str]) -> LaunchSize | None:
    """The task count from the first launcher variable present (None: no launcher, or unreadable)."""
    for name in LAUNCHER_SIZE_VARIABLES:
        value = environ.get(name, "").strip()
        if value:
            return LaunchSize(int(value), name) if value.isdigit() else None
    return None


def abort(world: World | None, message: str, code: int = 1) -> None:
    """Print once from this rank, then end every rank (a plain exit would hang mpiexec)."""
    sys.stderr.write(message.rstrip() + "\n")
    sys.stderr.flush()
    if world is not None and world.size > 1:
        world.comm.Abort(code)
    raise SystemExit(code)


# ------------------------------------------------------------------ small collectives


def bcast_bytes(world: World, payload: bytes | None) -> bytes:
    """Broadcast a byte string from rank 0 (length first, then the bytes)."""
    MPI = _mpi()
    length = np.array([len(payload) if world.is_root else 0], dtype=np.int64)
    world.comm.Bcast([length, MPI.INT64_T], root=0)
    _tally_bcast(world, length.nbytes)
    buffer = np.frombuffer(payload, dtype=np.uint8).copy() if world.is_root else np.empty(int(length[0]), np.uint8)
    bcast_array(world, buffer)
    return buffer.tobytes()


def _tally_bcast(world: World, nbytes: int) -> None:
    if world.is_root:
        _tally(world, sent=nbytes * (world.size - 1))
    else:
        _tally(world, received=nbytes)


def root_verdict(world: World, message: str | None) -> str:
    """Every rank learns rank 0's verdict ("" means all is well)."""
    if world.size == 1:
        return message or ""
    return bcast_bytes(world, (message or "").encode() if world.is_root else None).decode()


def reduce_max(world: World, values: np.ndarray) -> np.ndarray:
    MPI = _mpi()
    values = np.ascontiguousarray(values, dtype=np.float64)
    out = np.empty_like(values)
    world.comm.Allreduce([values, MPI.DOUBLE], [out, MPI.DOUBLE], op=MPI.MAX)
    _tally(world, sent=values.nbytes, received=values.nbytes)
    return out


def allreduce_sum(world: World, values: np.ndarray) -> np.ndarray:
    MPI = _mpi()
    values = np.ascontiguousarray(values, dtype=np.float64)
    out = np.empty_like(values)
    world.comm.Allreduce([values, MPI.DOUBLE], [out, MPI.DOUBLE], op=MPI.SUM)
    _tally(world, sent=values.nbytes, received=values.nbytes)
    return out


def gather_rows(world: World, rows: np.ndarray) -> np.ndarray | None:
    """Gather a (k_i × w) float64 array from every rank to rank 0 (k_i may differ)."""
    MPI = _mpi()
    rows = np.ascontiguousarray(rows, dtype=np.float64)
    width = rows.shape[1]
    counts = gather_counts(world, rows.size)
    out = np.empty(int(counts.sum()) if world.is_root else 0, dtype=np.float64)
    displs = _displacements(counts) if world.is_root else None
    recv = [out, counts, displs, MPI.DOUBLE] if world.is_root else None
    world.comm.Gatherv([rows.reshape(-1), MPI.DOUBLE], recv, root=0)
    _tally_gather(world, rows.nbytes, out.nbytes)
    return out.reshape(-1, width) if world.is_root else None


def _tally_gather(world: World, mine: int, everyone: int) -> None:
    """A gather to rank 0: each rank sends its `mine` bytes; rank 0 receives `everyone` less its own."""
    if world.is_root:
        _tally(world, received=everyone - mine)
    else:
        _tally(world, sent=mine)


def gather_counts(world: World, count: int) -> np.ndarray | None:
    MPI = _mpi()
    mine = np.array([count], dtype=np.int64)
    counts = np.empty(world.size, dtype=np.int64) if world.is_root else None
    world.comm.Gather([mine, MPI.INT64_T], [counts, MPI.INT64_T] if world.is_root else None, root=0)
    _tally_gather(world, mine.nbytes, mine.nbytes * world.size)
    return counts


def gather_text(world: World, text: str) -> list[str] | None:
    """Every rank's short string (a host name, say) at rank 0, in rank order."""
    MPI = _mpi()
    mine = np.frombuffer(text.encode(), dtype=np.uint8).copy()
    counts = gather_counts(world, mine.size)
    out = np.empty(int(counts.sum()) if world.is_root else 0, dtype=np.uint8)
    recv = [out, counts, _displacements(counts), MPI.BYTE] if world.is_root else None
    world.comm.Gatherv([mine, MPI.BYTE], recv, root=0)
    _tally_gather(world, mine.nbytes, out.nbytes if world.is_root else 0)
    if not world.is_root:
        return None
    return [part.tobytes().decode() for part in np.split(out, np.cumsum(counts)[:-1])]


def _displacements(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


# ------------------------------------------------------------------- big payloads


def gather_step_elements(chunk: int, size: int) -> int:
    """Elements per rank and step: rank 0's displacements add up over all ranks, so
    size × step must stay within MPI's int as well as each count."""
    return max(1, min(chunk, INT_MAX // size))


def gather_float32(world: World, local: np.ndarray, chunk: int | None = None) -> list[np.ndarray] | None:
    """Gather each rank's flat fp32 buffer to rank 0; returns one array per rank there.

    Sent in rounds of at most `chunk` elements per rank (and at most INT_MAX / size,
    so that rank 0's receive displacements add up to less than INT_MAX), so every
    Gatherv's counts and displacements fit MPI's int even when the total is many GiB.
    """
    gathered = gather_float32_concat(world, local, chunk)
    if gathered is None:
        return None
    everything, counts = gathered
    return np.split(everything, np.cumsum(counts)[:-1])


def gather_float32_concat(world: World, local: np.ndarray,
                          chunk: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Rank 0: (every rank's flat fp32 buffer concatenated in rank order, each rank's element count);
    None elsewhere. The chunking of `gather_float32`; one buffer, no copy after the receive (a world
    of one gets its own buffer back)."""
    MPI = _mpi()
    chunk = gather_step_elements(chunk or chunk_elements(), world.size)
    local = np.ascontiguousarray(local, dtype=np.float32).reshape(-1)
    if world.size == 1:
        return local, np.array([local.size], dtype=np.int64)
    counts = gather_counts(world, local.size)
    total_rounds = np.array([-(-local.size // chunk)], dtype=np.int64)
    world.comm.Allreduce(MPI.IN_PLACE, [total_rounds, MPI.INT64_T], op=MPI.MAX)
    _tally(world, sent=total_rounds.nbytes, received=total_rounds.nbytes)
    _tally_gather(world, local.nbytes, int(counts.sum()) * 4 if world.is_root else 0)
    everything = np.empty(int(counts.sum()) if world.is_root else 0, dtype=np.float32)
    if int(total_rounds[0]) <= 1:  # one step: straight into the one buffer
        recv = [everything, counts, _displacements(counts), MPI.FLOAT] if world.is_root else None
        world.comm.Gatherv([local, MPI.FLOAT], recv, root=0)
        return (everything, counts) if world.is_root else None
    starts = _displacements(counts) if world.is_root else None
    for step in range(int(total_rounds[0])):
        start = step * chunk
        piece = local[start : start + chunk]
        if world.is_root:
            sizes = np.clip(counts - start, 0, chunk).astype(np.int64)
            staging = np.empty(int(sizes.sum()), dtype=np.float32)
            world.comm.Gatherv([piece, MPI.FLOAT], [staging, sizes, _displacements(sizes), MPI.FLOAT], root=0)
            offset = 0
            for rank, size in enumerate(sizes):
                at = int(starts[rank]) + start
                everything[at : at + size] = staging[offset : offset + size]
                offset += size
        else:
            world.comm.Gatherv([piece, MPI.FLOAT], None, root=0)
    return (everything, counts) if world.is_root else None


def bcast_array(world: World, array: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """Broadcast a contiguous array from rank 0 in place, in int-safe chunks."""
    chunk = chunk or chunk_elements()
    flat = array.reshape(-1)
    if not flat.flags.c_contiguous:
        raise ValueError("bcast_array needs a contiguous array")
    for start in range(0, flat.size, chunk):
        world.comm.Bcast(flat[start : start + chunk], root=0)
    _tally_bcast(world, flat.nbytes)
    return array


def bcast_float32(world: World, payload: np.ndarray | None) -> np.ndarray:
    """Broadcast a flat fp32 buffer whose length only rank 0 knows."""
    MPI = _mpi()
    length = np.array([payload.size if world.is_root else 0], dtype=np.int64)
    world.comm.Bcast([length, MPI.INT64_T], root=0)
    _tally_bcast(world, length.nbytes)
    buffer = np.ascontiguousarray(payload, dtype=np.float32) if world.is_root else np.empty(int(length[0]), np.float32)
    return bcast_array(world, buffer)


def gather_digests(world: World, digest: bytes) -> list[bytes] | None:
    """Gather a fixed-size digest from every rank to rank 0."""
    MPI = _mpi()
    mine = np.frombuffer(digest, dtype=np.uint8).copy()
    out = np.empty(world.size * mine.size, dtype=np.uint8) if world.is_root else None
    world.comm.Gather([mine, MPI.BYTE], [out, MPI.BYTE] if world.is_root else None, root=0)
    _tally_gather(world, mine.nbytes, mine.nbytes * world.size)
    if not world.is_root:
        return None
    return [out[i * mine.size : (i + 1) * mine.size].tobytes() for i in range(world.size)]


# ------------------------------------------------- all-to-all and all-gather (sharded)


def exchange_step_elements(chunk: int, size: int) -> int:
    """Elements per rank pair and step of an all-to-all or all-gather: each count ≤ chunk,
    the displacements (a sum over `size` ranks) within MPI's int, the staging bounded."""
    return max(1, min(chunk, INT_MAX // size, STAGING_ELEMENTS // size))


def allgather_rows(world: World, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank gets every rank's (k_i × w) float64 rows, in rank order, and the k_i."""
    MPI = _mpi()
    rows = np.ascontiguousarray(rows, dtype=np.float64)
    width = rows.shape[1]
    mine = np.array([rows.shape[0]], dtype=np.int64)
    counts = np.empty(world.size, dtype=np.int64)
    world.comm.Allgather([mine, MPI.INT64_T], [counts, MPI.INT64_T])
    sizes = counts * width
    out = np.empty(int(sizes.sum()), dtype=np.float64)
    world.comm.Allgatherv([rows.reshape(-1), MPI.DOUBLE], [out, sizes, _displacements(sizes), MPI.DOUBLE])
    _tally_allgather(world, mine.nbytes, counts.nbytes)
    _tally_allgather(world, rows.nbytes, out.nbytes)
    return out.reshape(-1, width), counts


def _tally_allgather(world: World, mine: int, everyone: int) -> None:
    """An all-gather: each rank's `mine` bytes go to every other rank; it receives the others'."""
    _tally(world, sent=mine * (world.size - 1), received=everyone - mine)


class _PieceReader:
    """Reads a list of flat arrays as one stream, `take(n)` elements at a time (no concatenation)."""

    def __init__(self, pieces: list[np.ndarray]):
        self.pieces, self.index, self.offset = pieces, 0, 0

    def take_into(self, out: np.ndarray) -> None:
        filled = 0
        while filled < out.size:
            piece = self.pieces[self.index]
            count = min(out.size - filled, piece.size - self.offset)
            out[filled : filled + count] = piece[self.offset : self.offset + count]
            filled += count
            self.offset += count
            if self.offset == piece.size:
                self.index, self.offset = self.index + 1, 0


def _max_steps(world: World, totals: np.ndarray, step: int) -> int:
    MPI = _mpi()
    steps = np.array([-(-int(totals.max(initial=0)) // step)], dtype=np.int64)
    world.comm.Allreduce(MPI.IN_PLACE, [steps, MPI.INT64_T], op=MPI.MAX)
    _tally(world, sent=steps.nbytes, received=steps.nbytes)
    return int(steps[0])


def alltoallv_float32(world: World, outgoing: list[list[np.ndarray]], incoming: list[np.ndarray],
                      chunk: int | None = None) -> None:
    """Send outgoing[d] (flat fp32 pieces, read in order) to rank d; fill incoming[s] from rank s.

    incoming[s] must have exactly the size rank s sends here (both sides know it from
    metadata exchanged before). Moved in steps of at most `exchange_step_elements` per rank
    pair, so every count and displacement fits MPI's int whatever the totals, and only one
    step's staging buffers exist at a time.
    """
    MPI = _mpi()
    step = exchange_step_elements(chunk or chunk_elements(), world.size)
    send_totals = np.array([sum(p.size for p in pieces) for pieces in outgoing], dtype=np.int64)
    recv_totals = np.array([a.size for a in incoming], dtype=np.int64)
    readers = [_PieceReader(pieces) for pieces in outgoing]
    others = np.arange(world.size) != world.rank
    _tally(world, sent=4 * int(send_totals[others].sum()), received=4 * int(recv_totals[others].sum()))
    for index in range(_max_steps(world, np.concatenate([send_totals, recv_totals]), step)):
        start = index * step
        send_sizes = np.clip(send_totals - start, 0, step).astype(np.int64)
        recv_sizes = np.clip(recv_totals - start, 0, step).astype(np.int64)
        send, send_displs = np.empty(int(send_sizes.sum()), np.float32), _displacements(send_sizes)
        for rank, (offset, size) in enumerate(zip(send_displs, send_sizes)):
            if size:
                readers[rank].take_into(send[offset : offset + size])
        recv, recv_displs = np.empty(int(recv_sizes.sum()), np.float32), _displacements(recv_sizes)
        world.comm.Alltoallv([send, send_sizes, send_displs, MPI.FLOAT], [recv, recv_sizes, recv_displs, MPI.FLOAT])
        for rank, (offset, size) in enumerate(zip(recv_displs, recv_sizes)):
            incoming[rank][start : start + size] = recv[offset : offset + size]


def allgatherv_float32(world: World, local: np.ndarray, chunk: int | None = None) -> list[np.ndarray]:
    """Every rank gets every rank's flat fp32 buffer (one array per rank), in int-safe steps."""
    MPI = _mpi()
    step = exchange_step_elements(chunk or chunk_elements(), world.size)
    local = np.ascontiguousarray(local, dtype=np.float32).reshape(-1)
    mine = np.array([local.size], dtype=np.int64)
    totals = np.empty(world.size, dtype=np.int64)
    world.comm.Allgather([mine, MPI.INT64_T], [totals, MPI.INT64_T])
    _tally_allgather(world, mine.nbytes, totals.nbytes)
    _tally_allgather(world, local.nbytes, 4 * int(totals.sum()))
    out = [np.empty(int(t), dtype=np.float32) for t in totals]
    for index in range(-(-int(totals.max(initial=0)) // step)):
        start = index * step
        sizes = np.clip(totals - start, 0, step).astype(np.int64)
        staging, displs = np.empty(int(sizes.sum()), np.float32), _displacements(sizes)
        world.comm.Allgatherv([local[start : start + int(sizes[world.rank])], MPI.FLOAT],
                              [staging, sizes, displs, MPI.FLOAT])
        for rank, (offset, size) in enumerate(zip(displs, sizes)):
            out[rank][start : start + size] = staging[offset : offset + size]
    return out


def send_float32(world: World, pieces: list[np.ndarray], dest: int, chunk: int | None = None) -> None:
    """Send flat fp32 pieces to `dest` as one stream, in messages of at most `chunk` elements."""
    MPI = _mpi()
    chunk = chunk or chunk_elements()
    total = sum(p.size for p in pieces)
    reader, buffer = _PieceReader(pieces), np.empty(min(chunk, total), np.float32)
    for start in range(0, total, chunk):
        piece = buffer[: min(chunk, total - start)]
        reader.take_into(piece)
        world.comm.Send([piece, MPI.FLOAT], dest=dest, tag=7)
    _tally(world, sent=4 * total)


def recv_float32(world: World, out: np.ndarray, source: int, chunk: int | None = None) -> np.ndarray:
    """Receive what `send_float32` sends into the flat fp32 array `out` (its size is known)."""
    MPI = _mpi()
    chunk = chunk or chunk_elements()
    for start in range(0, out.size, chunk):
        world.comm.Recv([out[start : start + chunk], MPI.FLOAT], source=source, tag=7)
    _tally(world, received=out.nbytes)
    return out
