"""Run under mpiexec -n 2: rank 1 claims a GPU, rank 0 stays on CPU; place_rank must refuse the mix on both.

Each rank prints `REFUSED <message>` or `PLACED <summary>` (tests/test_devices.py).
"""
import sys

import numpy as np
import torch

from florist_mpi import comm, devices
from florist_mpi.config import config_from_tree
from florist_mpi.errors import UserError

world = comm.init_world()
if world.rank == 1 or "--all-gpu" in sys.argv:  # this rank behaves as a rank on a GPU would
    devices.select_device = lambda local_rank, choice: torch.device("cuda", 0)
    devices.device_identity = lambda device: np.array([1.0, 7.0, 7.0, 7.0, 7.0])
    torch.cuda.get_device_name = lambda device=None: "Fake GPU"
try:
    placement = devices.place_rank(world, config_from_tree({"run": {"device": "auto"}}))
    print(f"PLACED {world.rank} {placement.summary} sharing={placement.ranks_on_my_gpu}", flush=True)
except UserError as err:
    print(f"REFUSED {world.rank} {err}", flush=True)
