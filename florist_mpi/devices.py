"""Where every rank computes: `run.device`, agreed by all ranks, and timing work on a GPU.

`run.device: cuda` refuses to start on a rank without CUDA; `cpu` never touches a GPU;
`auto` takes a GPU where the rank sees one. A rank's GPU is chosen by its node-local rank
(local rank mod the visible GPUs), which works with one or all GPUs visible per task.
At start-up every rank's choice is all-gathered: a job whose ranks mix CPU and GPU is
refused on every rank before any work (its clients would train at different precisions
and the ranks' merged weights would differ after round 0). Ranks that share one GPU are
counted from the GPUs' UUIDs, so `run.gpu_memory_fraction: share` can cap each one at its
share of the device.

CUDA runs kernels asynchronously: the wall time of a block that launches GPU work is
only the time to launch it unless the block ends with a synchronisation. `timed` does
that for a block on a CUDA device.
"""
from __future__ import annotations

import gc
import hashlib
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from florist_mpi.config import ExperimentConfig
from florist_mpi.errors import UserError

NO_CUDA = (
    "{setting} is cuda but {where} sees no CUDA device (torch {torch}, torch.cuda.is_available() is False): "
    "install a CUDA build of torch, give the job a GPU (check CUDA_VISIBLE_DEVICES), or {fix}"
)
RUN_DEVICE_FIX = "set run.device: auto or cpu"
# all-gathered per rank: [on CUDA, 4 x 32 bits of the GPU's identity]
PLACEMENT_WIDTH = 5


def cuda_visible() -> bool:
    """Whether this process can use at least one CUDA device."""
    return bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)


def no_cuda_message(where: str = "this machine", setting: str = "run.device", fix: str = RUN_DEVICE_FIX) -> str:
    return NO_CUDA.format(setting=setting, where=where, torch=torch.__version__, fix=fix)


def select_device(local_rank: int, choice: str = "auto", setting: str = "run.device",
                  fix: str = RUN_DEVICE_FIX) -> torch.device:
    """This rank's device: GPU `local_rank mod visible GPUs` for cuda/auto, else CPU (see module doc).
    `setting` and `fix` word the refusal of cuda without CUDA."""
    if choice == "cpu":
        return torch.device("cpu")
    if not cuda_visible():
        if choice == "cuda":
            raise UserError(no_cuda_message(f"rank {local_rank} (node-local) of {socket.gethostname()}", setting, fix))
        return torch.device("cpu")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def device_identity(device: torch.device) -> np.ndarray:
    """PLACEMENT_WIDTH float64 numbers naming the physical device (equal rows: the same GPU).

    A GPU is named by its UUID (the same whatever CUDA_VISIBLE_DEVICES renumbers), or by
    host and PCI bus where torch does not report one; CPU rows are all zero.
    """
    row = np.zeros(PLACEMENT_WIDTH, dtype=np.float64)
    if device.type != "cuda":
        return row
    properties = torch.cuda.get_device_properties(device)
    name = str(getattr(properties, "uuid", "") or "")
    if not name:
        bus = (getattr(properties, "pci_domain_id", 0), getattr(properties, "pci_bus_id", 0),
               getattr(properties, "pci_device_id", 0))
        name = f"{socket.gethostname()}:{bus}"
    words = np.frombuffer(hashlib.blake2b(name.encode(), digest_size=16).digest(), dtype=np.uint32)
    row[0] = 1.0
    row[1:] = words.astype(np.float64)  # 32-bit integers are exact in float64
    return row


@dataclass
class Placement:
    """Where this rank computes, and what the job as a whole chose (the same on every rank)."""

    device: torch.device
    choice: str  # run.device
    ranks: int  # ranks in the job
    ranks_on_my_gpu: int  # ranks that share this rank's GPU, itself included (0 on CPU)
    gpus: int  # distinct GPUs the job uses
    name: str = ""  # this rank's GPU model

    @property
    def summary(self) -> str:
        """The banner's word on the device, e.g. `cuda (auto): 4 ranks on 1 GPU (NVIDIA H200)`."""
        how = " (auto)" if self.choice == "auto" else ""
        if self.device.type == "cpu":
            reason = " (run.device auto: no CUDA device)" if self.choice == "auto" else ""
            return f"cpu{reason}"
        gpu_word = "GPU" if self.gpus == 1 else "GPUs"
        return f"cuda{how}: {self.ranks} rank(s) on {self.gpus} {gpu_word} ({self.name})"


def mixed_devices_message(rows: np.ndarray, choice: str) -> str | None:
    """The refusal for a job whose ranks mix CPU and GPU (None when they agree)."""
    on_gpu = [rank for rank, row in enumerate(rows) if row[0] == 1.0]
    on_cpu = [rank for rank, row in enumerate(rows) if row[0] != 1.0]
    if not on_gpu or not on_cpu:
        return None
    return (
        f"the ranks mix devices (run.device {choice}): ranks {_ranks_text(on_gpu)} on CUDA, "
        f"ranks {_ranks_text(on_cpu)} on CPU; give every rank a GPU (check CUDA_VISIBLE_DEVICES and the job's "
        "GPU request) or set run.device: cpu"
    )


def _ranks_text(ranks: list[int]) -> str:
    return str(ranks) if len(ranks) <= 8 else f"[{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}] ({len(ranks)})"


def placement_from_rows(rows: np.ndarray, rank: int, device: torch.device, choice: str) -> Placement:
    """This rank's Placement from every rank's device_identity row (refusing a mix)."""
    message = mixed_devices_message(rows, choice)
    if message:
        raise UserError(message)
    mine = rows[rank]
    on_gpu = mine[0] == 1.0
    sharing = int(sum(np.array_equal(row, mine) for row in rows)) if on_gpu else 0
    gpus = len({tuple(row) for row in rows}) if on_gpu else 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return Placement(device, choice, len(rows), sharing, gpus, name)


def memory_fraction(setting, ranks_on_gpu: int) -> float | None:
    """The share of its GPU's memory a rank may allocate (run.gpu_memory_fraction), None: no cap."""
    if setting is None:
        return None
    if setting == "share":
        return 1.0 / max(1, ranks_on_gpu)
    return float(setting)


def place_rank(world, cfg: ExperimentConfig) -> Placement:
    """Choose this rank's device (run.device), agree on it with every rank, and set up the process for it.

    Every rank calls this at start-up, collectively. CPU ranks get their share of the
    node's cores as torch threads; CUDA ranks get the memory cap of run.gpu_memory_fraction.
    """
    from florist_mpi import comm
    from florist_mpi.model import cores_for_rank

    device = select_device(world.local_rank, cfg.run.device)
    row = device_identity(device)[None, :]
    rows = comm.allgather_rows(world, row)[0] if world.size > 1 else row
    placement = placement_from_rows(rows, world.rank, device, cfg.run.device)
    if device.type == "cpu":
        torch.set_num_threads(cores_for_rank(world.local_size))
    else:
        fraction = memory_fraction(cfg.run.gpu_memory_fraction, placement.ranks_on_my_gpu)
        if fraction is not None:
            torch.cuda.set_per_process_memory_fraction(fraction, device)
    return placement


# ------------------------------------------------------------------ timing and memory


def synchronize(device: torch.device | None) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); nothing on CPU."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(timings: dict[str, float], key: str, device: torch.device | None = None) -> Iterator[None]:
    """timings[key] = wall seconds of the block, the device's queued work included (unset if it raises)."""
    start = time.perf_counter()
    yield
    synchronize(device)
    timings[key] = time.perf_counter() - start


def release_memory(device: torch.device) -> None:
    """Collect unreachable objects, then hand the CUDA caching allocator's free blocks back to the driver."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
