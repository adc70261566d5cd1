"""What the data modules share: their error, their random streams, the set-aside share.

Every split and every generated example is a pure function of (config, number of clients, run
seed): each random choice draws from its own stream, `data_rng(seed, ..., DataStream.X)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class DataError(ValueError):
    """A user-facing data problem; the message is one line naming the file/field and the fix."""


class DataStream(IntEnum):
    """SeedSequence tags of this module's random streams (part of the reproducibility contract)."""

    SYNTHETIC_CLIENT = 101
    SYNTHETIC_EVAL = 102
    PARTITION = 103
    SET_ASIDE = 104


@dataclass(frozen=True)
class SetAside:
    """A share of the training data kept away from the clients (the tiny base model's warm-up data).

    Chosen from its own seed, not the run's, so runs that share a base model share its data too.
    """

    fraction: float
    seed: int


def data_rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(value) for value in entropy]))
