"""What a rank's process uses and where it runs: peak memory per round, start-up, host, Slurm ids.

Peak resident memory per round: on Linux the process's high-water mark (VmHWM) is reset at the
start of every round by writing 5 to /proc/self/clear_refs (Linux ≥ 4.0), so the value read at the
end of the round is that round's peak. Where that is not possible (another OS, a locked-down
/proc) the value is the peak since the process started (`getrusage`), and `peak_rss_scope` says
so. GPU peaks come from torch's allocator statistics, reset the same way.
"""
from __future__ import annotations

import os
import resource
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from florist_mpi import comm
from florist_mpi.storage import RANK_COLUMNS

SLURM_IDS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")


def process_start_time() -> float:
    """When this process started (time.time() scale); the interpreter's start-up is part of a run's."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # starttime: clock ticks after boot (field 22 of proc(5))
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT


_IMPORTED_AT = time.time()


class PeakMemory:
    """Peak resident (and GPU) memory of this process, one round at a time."""

    def __init__(self, device: torch.device):
        self.device = device
        self.per_round = self._reset_rss()  # False: peaks are since the process started

    @property
    def scope(self) -> str:
        return "round" if self.per_round else "process"

    @staticmethod
    def _reset_rss() -> bool:
        if not sys.platform.startswith("linux"):
            return False
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def start_round(self) -> None:
        if self.per_round:
            self._reset_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_rss_bytes(self) -> int:
        if sys.platform.startswith("linux"):
            try:
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
            except (OSError, ValueError):
                pass
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux

    def peak_gpu_bytes(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else 0


@dataclass(frozen=True)
class Placement:
    """Where a rank runs: its host and how many threads its torch operations use."""

    host: str
    threads: int

    @staticmethod
    def here() -> "Placement":
        return Placement(host=socket.gethostname(), threads=torch.get_num_threads())


def slurm_ids(environ=os.environ) -> dict[str, str]:
    """The Slurm job and array ids of this job ("" when not under Slurm)."""
    return {name.lower(): environ.get(name, "") for name in SLURM_IDS}


# ------------------------------------------------------------------ every rank's figures


INTEGER_COLUMNS = ("clients", "peak_rss_bytes", "mpi_bytes_sent", "mpi_bytes_received", "peak_gpu_bytes")


class RankMonitor:
    """Per-round figures of every rank (the log's `ranks/` group) and, once per launch, where the
    ranks run and how long they took to start (root attributes; docs/log-format.md)."""

    def __init__(self, world, device: torch.device):
        self.world, self.device = world, device
        self.memory = PeakMemory(device)
        self._traffic = (0, 0)

    def launch(self) -> dict | None:
        """Rank 0: time_startup (the slowest rank's, from its process start to now), hosts, node count,
        threads per rank and the Slurm ids; None elsewhere. A collective: call on every rank."""
        world = self.world
        startup = np.array([time.time() - process_start_time()])
        if world.size > 1:
            startup = comm.reduce_max(world, startup)
        here = Placement.here()
        row = np.array([[here.threads, self.memory.peak_rss_bytes()]], dtype=np.float64)  # the peak so far
        hosts = comm.gather_text(world, here.host) if world.size > 1 else [here.host]
        rows = comm.gather_rows(world, row) if world.size > 1 else row
        if not world.is_root:
            return None
        return {
            "time_startup": float(startup[0]),
            "hosts": hosts,
            "num_nodes": len(set(hosts)),
            "threads_per_rank": rows[:, 0].astype(np.int64),
            "startup_peak_rss_bytes": rows[:, 1].astype(np.int64),
            "peak_rss_scope": self.memory.scope,
            **slurm_ids(),
        }

    def start_round(self) -> None:
        self.memory.start_round()
        self._traffic = (comm.TRAFFIC.sent, comm.TRAFFIC.received)

    def gather(self, timings: dict[str, float], clients: int) -> dict[str, np.ndarray] | None:
        """Rank 0: column -> one value per rank (RANK_COLUMNS) for the round so far; None elsewhere.
        The MPI bytes count this round's collectives up to here (not the log's own traffic)."""
        row = [
            timings.get("time_train", 0.0), timings.get("time_wait", 0.0), clients,
            self.memory.peak_rss_bytes(),
            comm.TRAFFIC.sent - self._traffic[0], comm.TRAFFIC.received - self._traffic[1],
            self.memory.peak_gpu_bytes(),
        ]
        rows = np.array([row], dtype=np.float64)
        if self.world.size > 1:
            rows = comm.gather_rows(self.world, rows)
        if not self.world.is_root:
            return None
        columns = {}
        for index, name in enumerate(RANK_COLUMNS):
            if name == "peak_gpu_bytes" and self.device.type != "cuda":
                continue
            values = rows[:, index]
            columns[name] = values.astype(np.int64) if name in INTEGER_COLUMNS else values
        return columns
