"""Seeds derived from (run seed, round, client, purpose) only.

Every random choice goes through here, so a run's result does not depend on how
many ranks run it or which rank hosts which client.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """Independent random streams; the numbers are part of the reproducibility contract."""

    LORA_INIT = 1
    DATA_ORDER = 2
    SAMPLING = 3
    DROPOUT = 4
    FROZEN_A = 5
    # per-client device and link profiles of the simulated clock (drawn once per run: round slot 0)
    SYSTEM_COMPUTE_SPEED = 6
    SYSTEM_DOWNLINK = 7
    SYSTEM_UPLINK = 8
    SYSTEM_LATENCY = 9


def derive_seed(run_seed: int, round_index: int, client_id: int, stream: Stream) -> int:
    state = np.random.SeedSequence([int(run_seed), int(round_index) + 1, int(client_id) + 1, int(stream)])
    return int(state.generate_state(1, dtype=np.uint32)[0])


def rng(run_seed: int, round_index: int, client_id: int, stream: Stream) -> np.random.Generator:
    return np.random.default_rng(derive_seed(run_seed, round_index, client_id, stream))
