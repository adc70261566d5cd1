"""The simulated deployment clock: how long a round would take on the clients' devices and links.

Pure model, no MPI and no I/O (CSV profiles are read by `data.system_tables`). Every
figure derives from the config, the run seed and the round's plan (which clients train,
how many tokens they process, which factors travel), never from measured wall time, so
a run gives the same simulated times on 1 or N ranks, CPU or GPU, and after --resume.

A round of client k (docs/simulated-clock.md):

    download_k = transfer(bytes_down_k, downlink_mbps_k)      the previous round's global factors
    compute_k  = tokens_k · flops_per_token_k / (reference_flops · compute_speed_k)
    upload_k   = transfer(bytes_up_k, uplink_mbps_k)          the client's own factors
    transfer(b, mbps) = latency_s_k + 8 b / (mbps · 10⁶)       (0 when nothing is sent)

    round time = server_s + wait
    wait = max over the clients that trained of (download_k + compute_k + upload_k)   (all arrived)
         = system.deadline_s                       (a straggler or dropout never arrived)

Training cost per token (Kaplan et al., "Scaling Laws for Neural Language Models", 2020,
§2.1: a forward pass costs 2 FLOPs per weight and token, the backward pass twice that, one
half for activation gradients and one half for weight gradients). A frozen weight skips its
weight gradient, so LoRA training costs

    flops_per_token = 4 · (N_base + N_adapter) + 2 · N_trainable

with N_base the weights of every linear layer of the base model (embedding lookups cost no
multiply-adds), N_adapter = Σ_modules r_k (m + n) and N_trainable the adapter weights that
get gradients (FFA-LoRA: B only, r_k · m). The attention-score term (2 · layers · context ·
width per token, small for short contexts) is left out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from florist_mpi import methods
from florist_mpi.config import PROFILE_KEYS, CsvProfile, LognormalProfile, SystemConfig, UniformProfile
from florist_mpi.seeding import Stream, rng

BYTES_PER_FLOAT = 4  # factors travel as fp32
STREAMS = {
    "compute_speed": Stream.SYSTEM_COMPUTE_SPEED, "downlink_mbps": Stream.SYSTEM_DOWNLINK,
    "uplink_mbps": Stream.SYSTEM_UPLINK, "latency_s": Stream.SYSTEM_LATENCY,
}


# ------------------------------------------------------------------ client profiles


@dataclass(frozen=True)
class ClientProfile:
    """Per-client device and link values, each a float64 array indexed by client id."""

    compute_speed: np.ndarray
    downlink_mbps: np.ndarray
    uplink_mbps: np.ndarray
    latency_s: np.ndarray


def draw_values(spec, key: str, num_clients: int, seed: int, table: np.ndarray | None = None) -> np.ndarray:
    """One profile key's value for every client.

    A number is every client's value, a list one per client, a distribution one draw per
    client from its own stream (seed, round slot 0, client, key), a CSV column `table`.
    """
    if isinstance(spec, CsvProfile):
        if table is None:
            raise ValueError(f"system.{key}: the CSV column was not loaded")
        return np.asarray(table, dtype=np.float64)
    if isinstance(spec, (int, float)):
        return np.full(num_clients, float(spec))
    if isinstance(spec, list):
        return np.asarray(spec, dtype=np.float64)
    values = np.empty(num_clients)
    for client in range(num_clients):
        generator = rng(seed, 0, client, STREAMS[key])
        if isinstance(spec, LognormalProfile):
            values[client] = spec.median * math.exp(spec.sigma * generator.standard_normal())
        elif isinstance(spec, UniformProfile):
            values[client] = spec.low + (spec.high - spec.low) * generator.random()
        else:
            raise TypeError(f"system.{key}: unsupported profile {spec!r}")
    return values


def resolve_profile(system: SystemConfig, num_clients: int, seed: int,
                    tables: Mapping[str, np.ndarray] | None = None) -> ClientProfile:
    """Every client's values; `tables` holds the CSV columns of keys given as {csv: PATH}."""
    tables = tables or {}
    values = {key: draw_values(getattr(system, key), key, num_clients, seed, tables.get(key)) for key in PROFILE_KEYS}
    return ClientProfile(**values)


# ------------------------------------------------------------------------- bytes


def wire_floats(method: str, rank: int, m: int, n: int) -> int:
    """Floats one module's rank-`rank` factors take on the wire (FFA-LoRA: B only, A is frozen and shared)."""
    return methods.get(method).wire_floats(rank, m, n)


def upload_bytes(method: str, shapes: Mapping[str, tuple[int, int]], client_rank: int) -> int:
    """fp32 bytes of one client's own factors."""
    return BYTES_PER_FLOAT * sum(wire_floats(method, client_rank, m, n) for m, n in shapes.values())


def download_bytes(method: str, shapes: Mapping[str, tuple[int, int]], global_ranks: Mapping[str, int] | None,
                   client_rank: int, residual_ranks: Mapping[str, int] | None = None) -> int:
    """fp32 bytes of the global factors (module -> r_g) one client receives (`Method.downlink_floats`):
    FlexLoRA and HetLoRA send each client its rank-r_k prefix; FedEx-LoRA also sends the residual
    (module -> its rank q, `residual_ranks`) in the cheaper of its low-rank and dense forms. None
    (before the first aggregation) is nothing to receive."""
    if global_ranks is None:
        return 0
    total, method, residual_ranks = 0, methods.get(method), residual_ranks or {}
    for name, (m, n) in shapes.items():
        total += method.downlink_floats(global_ranks[name], client_rank, m, n, residual_ranks.get(name, 0))
    return BYTES_PER_FLOAT * total


def transfer_seconds(num_bytes: int, mbps: float, latency_s: float) -> float:
    """latency + 8 · bytes / (Mbit/s · 10⁶); a transfer of nothing takes no time."""
    if num_bytes <= 0:
        return 0.0
    return float(latency_s) + 8.0 * num_bytes / (float(mbps) * 1e6)


# ------------------------------------------------------------------------- compute


def adapter_params(method: str, shapes: Mapping[str, tuple[int, int]], client_rank: int) -> tuple[int, int]:
    """(adapter weights, of which trainable) of one client's LoRA."""
    total = sum(client_rank * (m + n) for m, n in shapes.values())
    trainable = sum(methods.get(method).trainable_weights(client_rank, m, n) for m, n in shapes.values())
    return total, trainable


def training_flops_per_token(base_params: int, adapter_weights: int, trainable_weights: int) -> float:
    """4 · (N_base + N_adapter) + 2 · N_trainable (module docstring)."""
    return 4.0 * (base_params + adapter_weights) + 2.0 * trainable_weights


@dataclass(frozen=True)
class ClientWork:
    """What one client does in a round, known before it trains."""

    client_id: int
    tokens: int  # tokens its micro-batches hold, padding included (the device computes them)
    flops: float
    bytes_down: int
    bytes_up: int


@dataclass(frozen=True)
class ClientTimes:
    download_s: float
    compute_s: float
    upload_s: float

    @property
    def total_s(self) -> float:
        return self.download_s + self.compute_s + self.upload_s


def client_times(work: ClientWork, profile: ClientProfile, reference_flops: float) -> ClientTimes:
    k = work.client_id
    return ClientTimes(
        download_s=transfer_seconds(work.bytes_down, profile.downlink_mbps[k], profile.latency_s[k]),
        compute_s=work.flops / (reference_flops * float(profile.compute_speed[k])),
        upload_s=transfer_seconds(work.bytes_up, profile.uplink_mbps[k], profile.latency_s[k]),
    )


# ----------------------------------------------------------------- who finishes


@dataclass(frozen=True)
class Schedule:
    """Which of a round's candidates train (and may be aggregated) and which are stragglers."""

    train: list[int]  # ascending client ids
    stragglers: list[tuple[int, str]]  # (client id, reason)


def distinct_seconds(value: float, other: float) -> tuple[str, str]:
    """Two times with the fewest significant digits (at least 3) that tell them apart."""
    for digits in range(3, 18):
        a, b = f"{value:.{digits}g}", f"{other:.{digits}g}"
        if a != b:
            return a, b
    return repr(value), repr(other)


def schedule(times: Mapping[int, ClientTimes], target: int, deadline_s: float | None) -> Schedule:
    """Clients over the deadline are stragglers; of the rest, the first `target` to finish (ties by
    id) train and any others are stragglers of over-commitment."""
    stragglers, on_time = [], []
    for client, t in sorted(times.items()):
        if deadline_s is not None and t.total_s > deadline_s:
            took, limit = distinct_seconds(t.total_s, deadline_s)
            reason = f"straggler: simulated {took}s exceeds system.deadline_s {limit}s"
            stragglers.append((client, reason))
        else:
            on_time.append(client)
    order = sorted(on_time, key=lambda c: (times[c].total_s, c))
    for client in order[target:]:
        stragglers.append(
            (
                client,
                f"straggler: finished after the first {target} "
                f"(simulated {times[client].total_s:.4g}s, federation.overcommit)",
            )
        )
    return Schedule(train=sorted(order[:target]), stragglers=sorted(stragglers))


# ---------------------------------------------------------------------- the server


def aggregation_flops(
    method: str, shapes: Mapping[str, tuple[int, int]], client_ranks: list[int], global_ranks: Mapping[str, int]
) -> float:
    """FLOPs of aggregating the clients' factors, summed over modules: each method's one cost plan
    (`Method.server_flops` = `Method.plan(...).flops`, florist_mpi.costmodel), the same plan that picks
    FLoRIST's route in `aggregate()` and balances sharded owners.

    With K clients, R = Σ r_k, r_max = max r_k, r_g the module's global rank, s = min(m, n),
    l = max(m, n) (docs/simulated-clock.md):
      fedit     2 R (m + n)                   weighted sums of B and A over the stack columns
      ffa       2 R m                         weighted sum of B
      flora     R (m + n)                     scaling while stacking
      florist   the cheaper exact route, as aggregate() picks it (costmodel.florist_plan):
                gram   Grams of both stacks (m + n) R² (1 + 1/b), then 18 R³ (Cholesky, core,
                       eigensolver), then the stacks times R × r_g: 2 (m + n) R r_g
                dense  ΔW 2 m n R, its Gram s² l (1 + 1/b), an s × s eigensolver 13 s³, then ΔW
                       projected on r_g vectors: 2 m n r_g
                (b: the strips a Gram's triangle is formed in, costmodel.gram_strips)
      flexlora  2 m n R + 6 l s² + 20 s³      forming ΔW, then its thin SVD
      fedex     2 R (m + n) + m r_max         FedIT's weighted sums, then −B̄ for the residual's factors
                                              (its left block B_s diag(p) is the sums' own scaled stack)
      hetlora   2 K r_max² (m + n + 1)        the update norms ‖B_k A_k‖_F from r_max-padded Grams,
                + 2 R (m + n)                 then the norm-weighted sums of B and A
    A logged spectrum (fedit, ffa, flora) is the simulator's work, not a server's: not charged.
    """
    K, R, r_max = len(client_ranks), sum(client_ranks), max(client_ranks, default=0)
    method = methods.get(method)
    return sum(method.server_flops(m, n, K, R, r_max, global_ranks.get(name, 0)) for name, (m, n) in shapes.items())


def round_seconds(server_s: float, arrived: list[ClientTimes], complete: bool = True,
                  deadline_s: float | None = None) -> float:
    """server time + how long the server waited for the clients' uploads.

    `arrived` are the clients the server heard from: the aggregated ones and those it rejected
    after their upload arrived (failed, non-finite factors). When every client it waited for
    arrived (`complete`), it waited for the last of them; when some never did (a straggler past
    `system.deadline_s` or a dropout), it could not know that before the deadline passed, so it
    waited until the deadline. With over-commitment the round is complete, and closes, when the
    `clients_per_round`-th client arrives.
    """
    if not complete and deadline_s is not None:
        return server_s + deadline_s
    return server_s + max((t.total_s for t in arrived), default=0.0)


# ---------------------------------------------------------------------- the clock


@dataclass(frozen=True)
class RoundPlan:
    """One round's simulated figures, computed before training."""

    work: dict[int, ClientWork]
    times: dict[int, ClientTimes]
    schedule: Schedule


class Clock:
    """The simulated clock across rounds, the same on every rank and after --resume.

    `plan` decides before any training which of a round's clients finish in time; once the round is
    aggregated, `columns` and `close_round` give its clients/ datasets and its sim_* attributes, and
    `advance` records the global ranks the next round's clients download.
    """

    def __init__(self, cfg, shapes: Mapping[str, tuple[int, int]], base_params: int,
                 tables: Mapping[str, np.ndarray] | None = None):
        self.system, self.lora, self.method = cfg.system, cfg.lora, cfg.federation.method
        self.shapes, self.base_params = dict(shapes), int(base_params)
        self.target = cfg.federation.participants_per_round()
        self.profile = resolve_profile(cfg.system, cfg.federation.num_clients, cfg.run.seed, tables)
        self.global_ranks: dict[str, int] | None = None  # module -> r_g of the last round (what clients download)
        self.residual_ranks: dict[str, int] = {}  # module -> rank of the last round's residual (FedEx-LoRA)
        self.total_s = 0.0  # sim_clock_s so far
        self.round: RoundPlan | None = None  # the current round's plan

    def restore(self, total_s: float, global_factors: Mapping[str, tuple] | None,
                residuals: Mapping[str, tuple] | None = None) -> None:
        """The running total, and the last global update the next round's clients download, from the log
        (None: no round has had a global update yet, as at the start of a run)."""
        self.total_s = float(total_s)
        if global_factors is None:
            self.global_ranks, self.residual_ranks = None, {}
        else:
            self.advance(global_factors, residuals)

    def client_work(self, client_id: int, tokens: int) -> ClientWork:
        """What a client does this round, from the tokens its local work processes (padding included)."""
        rank = self.lora.rank_of(client_id)
        per_token = training_flops_per_token(self.base_params, *adapter_params(self.method, self.shapes, rank))
        return ClientWork(
            client_id=client_id,
            tokens=tokens,
            flops=tokens * per_token,
            bytes_down=download_bytes(self.method, self.shapes, self.global_ranks, rank, self.residual_ranks),
            bytes_up=upload_bytes(self.method, self.shapes, rank),
        )

    def plan(self, tokens: Mapping[int, int]) -> Schedule:
        """Simulated times of the clients that start the round (client id -> tokens of its local
        work), and which of them train."""
        work = {c: self.client_work(c, t) for c, t in sorted(tokens.items())}
        times = {c: client_times(w, self.profile, self.system.reference_flops) for c, w in work.items()}
        self.round = RoundPlan(work=work, times=times,
                               schedule=schedule(times, self.target, self.system.deadline_s))
        return self.round.schedule

    def advance(self, global_factors: Mapping[str, tuple], residuals: Mapping[str, tuple] | None = None) -> None:
        """The round's global factors (module -> (B m×r_g, A r_g×n)) and residual factors (FedEx-LoRA):
        what the next round's clients download; the clock keeps their ranks."""
        self.global_ranks = {name: int(B.shape[1]) for name, (B, _) in global_factors.items()}
        self.residual_ranks = {name: int(left.shape[1]) for name, (left, _) in (residuals or {}).items()}

    def columns(self, participants: list[int]) -> dict[str, np.ndarray]:
        """clients/ datasets, aligned with clients/id (zero bytes and NaN times: did not start)."""
        work, times = self.round.work, self.round.times
        nan = ClientTimes(math.nan, math.nan, math.nan)
        return {
            "bytes_down": np.array([work[c].bytes_down if c in work else 0 for c in participants], dtype=np.int64),
            "bytes_up": np.array([work[c].bytes_up if c in work else 0 for c in participants], dtype=np.int64),
            "sim_tokens": np.array([work[c].tokens if c in work else 0 for c in participants], dtype=np.int64),
            "sim_download_s": np.array([times.get(c, nan).download_s for c in participants], dtype=np.float64),
            "sim_compute_s": np.array([times.get(c, nan).compute_s for c in participants], dtype=np.float64),
            "sim_upload_s": np.array([times.get(c, nan).upload_s for c in participants], dtype=np.float64),
        }

    def close_round(self, kept: list[int], global_ranks: Mapping[str, int]) -> dict[str, float]:
        """sim_server_s, sim_time_s and the running total sim_clock_s of a completed round.

        The server heard from every client that trained (`schedule.train`, the aggregated and the
        rejected alike); the round is complete when they are as many as it waited for."""
        flops = 0.0
        if kept:  # a round without an aggregated client aggregates nothing
            flops = aggregation_flops(self.method, self.shapes, [self.lora.rank_of(c) for c in kept], global_ranks)
        server_s = flops / self.system.server_flops
        heard = self.round.schedule.train
        round_s = round_seconds(server_s, [self.round.times[c] for c in heard], complete=len(heard) >= self.target,
                                deadline_s=self.system.deadline_s)
        self.total_s += round_s
        return {"sim_server_s": float(server_s), "sim_time_s": float(round_s), "sim_clock_s": float(self.total_s)}
