"""`federation`: clients, sampling, the aggregation method and where it runs."""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator

from florist_mpi import methods
from florist_mpi.config.base import CONTRACT, Section


class FederationConfig(Section):
    num_clients: int = Field(
        8, ge=1, json_schema_extra=CONTRACT, description="clients, spread round-robin over the ranks"
    )
    # An int is a count of clients per round, a float in (0, 1] a fraction of them.
    clients_per_round: int | float | None = Field(
        None,
        json_schema_extra=CONTRACT,
        description=(
            "an integer is a count (`4`, also `4.0`), a number in (0, 1] a fraction (`0.5`; `1.0` = all); sampled"
            " per round from (seed, round); default: all"
        ),
    )
    method: str = Field(
        "florist",
        json_schema_extra=CONTRACT,
        description='aggregation method: a name registered in `florist_mpi.methods` (README.md, "Aggregation methods")',
    )
    tau: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        json_schema_extra=CONTRACT,
        description="FLoRIST energy threshold in (0, 1]; 1 keeps the exact weighted sum",
    )
    max_rank: int | None = Field(None, ge=1, description="cap on FLoRIST's global rank")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="probability that a sampled client drops out (simulated straggler)"
    )
    overcommit: float | None = Field(
        None,
        ge=0.0,
        description=(
            "≥ 0: sample `ceil(clients_per_round · (1 + overcommit))` clients and aggregate the first "
            "`clients_per_round` to finish on the simulated clock, the rest recorded as stragglers; needs a "
            "`system` section"
        ),
    )
    aggregation: Literal["root", "sharded"] = Field(
        "root",
        description=(
            "where aggregation runs: `root` (rank 0 gathers every client's factors and aggregates every module) "
            "or `sharded` (each module has an owner rank, balanced by estimated cost, that receives only that "
            "module's client factors and aggregates it; every rank then receives every global module). Same "
            "results and log either way; `sharded` spreads the memory and work over the ranks (README, "
            '"Many clients")'
        ),
    )

    empty_round: Literal["skip", "fail"] = Field(
        "skip",
        description=(
            "a round in which no sampled client can be aggregated (all dropped out, past `system.deadline_s`, "
            "or failed / non-finite): `skip` logs it as a round without a global update (every client in "
            "`clients/excluded` with its reason, the global model unchanged) and the run goes on; `fail` ends "
            "the run with one line, the log keeping the rounds before it"
        ),
    )

    @field_validator("method")
    @classmethod
    def _registered_method(cls, value: str) -> str:
        methods.get(value)  # ValueError naming the registered methods
        return value

    @field_validator("clients_per_round", mode="before")
    @classmethod
    def _count_or_fraction(cls, value):
        if value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("use a count (an integer such as 4) or a fraction (a number such as 0.5)")
        if isinstance(value, float) and value.is_integer() and value > 1:
            return int(value)  # 4.0: a count written as a float
        if isinstance(value, float):
            if not 0.0 < value <= 1.0:
                raise ValueError("a fraction must be in (0, 1]; write a count as an integer, e.g. 4")
        elif value < 1:
            raise ValueError("a count must be at least 1")
        return value

    def participants_per_round(self) -> int:
        """An integer is a count of clients, a float in (0, 1] (1.0 included) a fraction of them."""
        value = self.clients_per_round
        if value is None:
            return self.num_clients
        if isinstance(value, float):
            return max(1, math.ceil(value * self.num_clients - 1e-9))
        return int(value)

    def sampled_per_round(self) -> int:
        """Clients sampled per round: participants_per_round plus the overcommitted fraction, at most all."""
        target = self.participants_per_round()
        if not self.overcommit:
            return target
        return min(self.num_clients, math.ceil(target * (1.0 + self.overcommit) - 1e-9))
