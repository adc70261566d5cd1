"""`system`: the simulated deployment clock's client profiles, deadline and speeds."""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from florist_mpi.config.base import Section

DISTRIBUTION_HINT = (
    "use a number, a list (one per client), {distribution: lognormal, median: M, sigma: S}, "
    "{distribution: uniform, low: L, high: H} or {csv: PATH} (column named like the key)"
)


class LognormalProfile(Section):
    """Per-client values median · exp(sigma · z), z ~ N(0, 1) drawn from (seed, client)."""

    distribution: Literal["lognormal"] = Field(description="lognormal")
    median: float = Field(gt=0.0, description="median of the per-client values")
    sigma: float = Field(ge=0.0, description="standard deviation of the values' natural logarithm")


class UniformProfile(Section):
    """Per-client values uniform in [low, high], drawn from (seed, client)."""

    distribution: Literal["uniform"] = Field(description="uniform")
    low: float = Field(description="smallest value")
    high: float = Field(description="largest value")

    @model_validator(mode="after")
    def _ordered(self):
        if self.high < self.low:
            raise ValueError(f"uniform high ({self.high:g}) is below low ({self.low:g}): swap them")
        return self


class CsvProfile(Section):
    """Per-client values read from a CSV file with a header row and one row per client (in client order)."""

    csv: str = Field(description="path of the CSV file (relative paths: to the working directory)")
    column: str | None = Field(None, description="column to read (default: the key's own name)")


Profile = float | list[float] | LognormalProfile | UniformProfile | CsvProfile


def _profile_value(value, key: str, positive: bool):
    """A profile key's value as the type it names; bounds of literal numbers are checked here."""

    def check(number) -> float:
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValueError(DISTRIBUTION_HINT)
        if positive and number <= 0:
            raise ValueError(f"must be positive, got {number:g}")
        if not positive and number < 0:
            raise ValueError(f"must be zero or positive, got {number:g}")
        return float(number)

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return check(value)
    if isinstance(value, list):
        if not value:
            raise ValueError("the list is empty: give one value per client")
        return [check(v) for v in value]
    if isinstance(value, dict):
        kind = "csv" if "csv" in value else value.get("distribution")
        model = {"lognormal": LognormalProfile, "uniform": UniformProfile, "csv": CsvProfile}.get(kind)
        if model is None:
            raise ValueError(f"unknown distribution {kind!r}: {DISTRIBUTION_HINT}")
        try:
            profile = model.model_validate(value)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            what = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
            raise ValueError(f"{kind} {where}: {what}" if where else f"{kind}: {what}") from None
        if isinstance(profile, UniformProfile):
            check(profile.low)
        return profile
    if isinstance(value, (LognormalProfile, UniformProfile, CsvProfile)):
        return value
    raise ValueError(DISTRIBUTION_HINT)


class SystemConfig(Section):
    """Simulated deployment: device speeds and links of the clients (docs/simulated-clock.md)."""

    compute_speed: Profile = Field(
        1.0, description="device speed relative to the reference device (1.0 = reference_flops); > 0"
    )
    downlink_mbps: Profile = Field(100.0, description="server-to-client bandwidth in Mbit/s (10^6 bit/s); > 0")
    uplink_mbps: Profile = Field(20.0, description="client-to-server bandwidth in Mbit/s (10^6 bit/s); > 0")
    latency_s: Profile = Field(0.05, description="fixed cost of each transfer in seconds; >= 0")
    deadline_s: float | None = Field(
        None,
        gt=0.0,
        description="a client whose download + compute + upload exceeds this many simulated "
        "seconds is a straggler, left out of aggregation",
    )
    reference_flops: float = Field(
        1.0e12, gt=0.0, description="sustained training throughput (FLOP/s) of the reference device, compute_speed 1.0"
    )
    server_flops: float = Field(1.0e13, gt=0.0, description="sustained throughput (FLOP/s) of the aggregation server")

    @field_validator("compute_speed", "downlink_mbps", "uplink_mbps", "latency_s", mode="before")
    @classmethod
    def _profiles(cls, value, info):
        return _profile_value(value, info.field_name, positive=info.field_name != "latency_s")

    def profiles(self) -> dict[str, Profile]:
        return {key: getattr(self, key) for key in PROFILE_KEYS}


PROFILE_KEYS = ("compute_speed", "downlink_mbps", "uplink_mbps", "latency_s")
