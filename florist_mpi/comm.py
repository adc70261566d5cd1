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
INT_MAX = 2**31 - 1
CHUNK_ENV = "FLORIST_MPI_CHUNK_ELEMENTS"


def _mpi():
    from mpi4py import MPI

    return MPI


def chunk_elements() -> int:
    value = os.environ.get(CHUNK_ENV)
    return max(1, int(value)) if value else DEFAULT_CHUNK_ELEMENTS


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
    buffer = np.frombuffer(payload, dtype=np.uint8).copy() if world.is_root else np.empty(int(length[0]), np.uint8)
    bcast_array(world, buffer)
    return buffer.tobytes()


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
    return out


def allreduce_sum(world: World, values: np.ndarray) -> np.ndarray:
    MPI = _mpi()
    values = np.ascontiguousarray(values, dtype=np.float64)
    out = np.empty_like(values)
    world.comm.Allreduce([values, MPI.DOUBLE], [out, MPI.DOUBLE], op=MPI.SUM)
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
    return out.reshape(-1, width) if world.is_root else None


def gather_counts(world: World, count: int) -> np.ndarray | None:
    MPI = _mpi()
    mine = np.array([count], dtype=np.int64)
    counts = np.empty(world.size, dtype=np.int64) if world.is_root else None
    world.comm.Gather([mine, MPI.INT64_T], [counts, MPI.INT64_T] if world.is_root else None, root=0)
    return counts


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
    MPI = _mpi()
    chunk = gather_step_elements(chunk or chunk_elements(), world.size)
    local = np.ascontiguousarray(local, dtype=np.float32).reshape(-1)
    counts = gather_counts(world, local.size)
    total_rounds = np.array([-(-local.size // chunk)], dtype=np.int64)
    world.comm.Allreduce(MPI.IN_PLACE, [total_rounds, MPI.INT64_T], op=MPI.MAX)
    per_rank = [np.empty(int(c), dtype=np.float32) for c in counts] if world.is_root else None
    for step in range(int(total_rounds[0])):
        start = step * chunk
        piece = local[start : start + chunk]
        if world.is_root:
            sizes = np.clip(counts - start, 0, chunk).astype(np.int64)
            staging = np.empty(int(sizes.sum()), dtype=np.float32)
            world.comm.Gatherv([piece, MPI.FLOAT], [staging, sizes, _displacements(sizes), MPI.FLOAT], root=0)
            offset = 0
            for rank, size in enumerate(sizes):
                per_rank[rank][start : start + size] = staging[offset : offset + size]
                offset += size
        else:
            world.comm.Gatherv([piece, MPI.FLOAT], None, root=0)
    return per_rank


def bcast_array(world: World, array: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """Broadcast a contiguous array from rank 0 in place, in int-safe chunks."""
    MPI = _mpi()
    chunk = chunk or chunk_elements()
    flat = array.reshape(-1)
    if not flat.flags.c_contiguous:
        raise ValueError("bcast_array needs a contiguous array")
    for start in range(0, flat.size, chunk):
        world.comm.Bcast(flat[start : start + chunk], root=0)
    return array


def bcast_float32(world: World, payload: np.ndarray | None) -> np.ndarray:
    """Broadcast a flat fp32 buffer whose length only rank 0 knows."""
    MPI = _mpi()
    length = np.array([payload.size if world.is_root else 0], dtype=np.int64)
    world.comm.Bcast([length, MPI.INT64_T], root=0)
    buffer = np.ascontiguousarray(payload, dtype=np.float32) if world.is_root else np.empty(int(length[0]), np.float32)
    return bcast_array(world, buffer)


def gather_digests(world: World, digest: bytes) -> list[bytes] | None:
    """Gather a fixed-size digest from every rank to rank 0."""
    MPI = _mpi()
    mine = np.frombuffer(digest, dtype=np.uint8).copy()
    out = np.empty(world.size * mine.size, dtype=np.uint8) if world.is_root else None
    world.comm.Gather([mine, MPI.BYTE], [out, MPI.BYTE] if world.is_root else None, root=0)
    if not world.is_root:
        return None
    return [out[i * mine.size : (i + 1) * mine.size].tobytes() for i in range(world.size)]
