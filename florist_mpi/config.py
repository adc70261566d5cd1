"""Experiment configuration: YAML in, validated pydantic model out.

Every key is validated on load; errors name the dotted key and what to do. The
key names under `run`, `federation`, `lora`, `log` and the section names `model`,
`data`, `train`, `eval` are a public contract (see docs/configuration.md).
"""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from florist_mpi import methods

ALPHA_PER_RANK = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*r\s*$")


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is one line."""


CONTRACT = {"contract": True}  # json_schema_extra of the keys that are a stable public contract


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    rounds: int = Field(5, ge=1, json_schema_extra=CONTRACT, description="federated rounds")
    seed: int = Field(
        0, ge=0, json_schema_extra=CONTRACT, description="every random choice derives from (seed, round, client)"
    )
    output: str = Field(
        "runs/run.h5",
        json_schema_extra=CONTRACT,
        description=(
            "the HDF5 log file; its round files go to the folder `<output>.rounds/` beside it (docs/log-"
            "format.md); never overwritten silently (`--overwrite`, `--resume`)"
        ),
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description=(
        "where every rank trains: `cuda` (one GPU per rank, chosen by node-local rank; the run refuses to start "
        "where a rank sees no CUDA device), `cpu` (float32), or `auto` (CUDA where visible, else CPU; the banner "
        "says which). Every rank's device is compared at start-up: a job mixing CPU and GPU ranks is refused"))
    gpu_memory_fraction: float | Literal["share"] | None = Field(None, description=(
        "cap on the GPU memory each rank's PyTorch allocator may take (`torch.cuda.set_per_process_memory_fraction`):"
        " a fraction in (0, 1] of its GPU, or `share` for an even share among the ranks on that GPU; none: no cap. "
        "The cap covers tensors, not the CUDA context (docs/gpu.md)"))

    @field_validator("gpu_memory_fraction")
    @classmethod
    def _fraction_or_share(cls, value):
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError("a fraction must be in (0, 1], or use `share`")
        return value


class FederationConfig(_Section):
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


class TinyModelConfig(_Section):
    vocab_size: int = Field(512, ge=64, description="vocabulary size of the tiny model")
    hidden_size: int = Field(64, ge=8, description="hidden size of the tiny model")
    intermediate_size: int = Field(128, ge=8, description="MLP size of the tiny model")
    num_hidden_layers: int = Field(2, ge=1, description="decoder layers of the tiny model")
    num_attention_heads: int = Field(4, ge=1, description="attention heads of the tiny model")
    max_position_embeddings: int = Field(256, ge=16, description="longest sequence of the tiny model")


class ModelConfig(_Section):
    # "tiny" builds a small Llama-style model locally; anything else is a
    # Hugging Face id or a local directory loaded with from_pretrained.
    name: str = Field("tiny", description="`tiny` (built locally), a Hugging Face id, or a local model directory")
    tiny: TinyModelConfig = Field(TinyModelConfig(), description="the tiny model's shape (used when `name` is `tiny`)")
    # Centralised full fine-tuning steps before federation starts (tiny model
    # only): a stand-in for pretraining; the result is cached.
    warmup_steps: int = Field(
        0,
        ge=0,
        description=(
            "optional centralised full fine-tuning steps (batches of `train.micro_batch_size`) of the tiny model "
            "on `warmup_data` before federation starts (cached)"
        ),
    )
    warmup_lr: float = Field(3e-3, gt=0.0, description="learning rate of those warm-up steps")
    warmup_data: Literal["clients", "held_out"] = Field(
        "clients",
        description=(
            "what the warm-up trains on: `clients` (the pooled client training data, which the clients then "
            "fine-tune on again) or `held_out` (`warmup_fraction` of every client's records, or of a single file "
            "before `data.partition` splits it, set aside by `seed` and removed from the clients, so base and "
            "federation see disjoint data)"
        ),
    )
    warmup_text: Literal["examples", "prompts", "instructions"] = Field(
        "examples",
        description=(
            "what of those records the warm-up models: `examples` (template, prompt and response), `prompts` "
            "(instruction and context as plain text, no template, no response) or `instructions` (the "
            "instructions alone): the last two make a base that has never been trained on an answer (its "
            "tokenizer still learns from the whole records), for federated instruction tuning to teach"
        ),
    )
    warmup_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="`held_out`: share of every client's records set aside for the warm-up"
    )
    seed: int | None = Field(
        None,
        ge=0,
        description=(
            "seed of the tiny model's weights, its warm-up and the `held_out` set-aside; default `run.seed`. Set, "
            "it keeps one base model (built and cached once) across runs that differ in `run.seed`, unless the "
            "warm-up's data follow `run.seed` (generated data, or a `clients` warm-up on a seeded partition)"
        ),
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description=(
            "weights on GPU (`bfloat16`, `float16`); CPU always uses float32 (refused with `run.device: cpu`). "
            "Must match `train.precision` when "
            "that is `bf16`/`fp16`. Adapted weights stored in 16 bits keep an fp32 copy that global updates are "
            "merged into (4 bytes per adapted weight per rank)"
        ),
    )
    trust_remote_code: bool = Field(False, description="passed to `from_pretrained`")

    def base_seed(self, run_seed: int) -> int:
        """Seed of the tiny base model and its warm-up: `seed` when set, else the run's."""
        return run_seed if self.seed is None else self.seed

    def reserved_fraction(self) -> float:
        """Share of every client's records the warm-up takes away from federated training (tiny model only:
        a pretrained model has no warm-up, so its clients keep all their data)."""
        held_out = self.name == "tiny" and self.warmup_steps and self.warmup_data == "held_out"
        return self.warmup_fraction if held_out else 0.0


class LoraConfig(_Section):
    rank: int = Field(8, ge=1, json_schema_extra=CONTRACT, description="LoRA rank of every client")
    ranks: list[int] | None = Field(
        None, json_schema_extra=CONTRACT, description="one rank per client (heterogeneous); overrides `rank`"
    )
    # A number, or "<k>r" for alpha = k * rank (the paper's alpha = 2r).
    alpha: float | str = Field(
        16.0, json_schema_extra=CONTRACT, description="a number, or `<k>r` for α = k · rank (the paper's `2r`)"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout")
    target_modules: list[str] = Field(["q_proj", "v_proj"], description="linear layers to adapt (last name component)")

    @field_validator("ranks")
    @classmethod
    def _ranks_positive(cls, value):
        if value is not None and (not value or any(r < 1 for r in value)):
            raise ValueError("every rank must be a positive integer")
        return value

    @field_validator("alpha")
    @classmethod
    def _alpha_form(cls, value):
        if isinstance(value, str):
            if not ALPHA_PER_RANK.match(value):
                raise ValueError("use a number or the form '<k>r', e.g. '2r' for alpha = 2 * rank")
        elif value <= 0:
            raise ValueError("must be positive")
        return value

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value):
        if not value:
            raise ValueError("name at least one module, e.g. [q_proj, v_proj]")
        return value

    def rank_of(self, client_id: int) -> int:
        return self.ranks[client_id] if self.ranks is not None else self.rank

    def alpha_of(self, client_id: int) -> float:
        if isinstance(self.alpha, str):
            return float(ALPHA_PER_RANK.match(self.alpha).group(1)) * self.rank_of(client_id)
        return float(self.alpha)

    def scaling_of(self, client_id: int) -> float:
        return self.alpha_of(client_id) / self.rank_of(client_id)


class SyntheticDataConfig(_Section):
    tasks: list[str] = Field(["reverse", "sort", "add", "copy", "count", "upper"], description="generated tasks")
    examples_per_client: int = Field(256, ge=1, description="generated training examples per client")
    eval_examples: int = Field(256, ge=1, description="generated held-out examples")
    # Dirichlet concentration of each client's task mix: small = strongly non-IID.
    concentration: float = Field(
        0.3, gt=0.0, description="each client's task mix ~ Dirichlet(concentration): small = strongly non-IID"
    )


class DataConfig(_Section):
    source: Literal["synthetic", "json"] = Field("synthetic", description="`synthetic` (generated, offline) or `json`")
    synthetic: SyntheticDataConfig = Field(
        SyntheticDataConfig(), description="the generated data (used when `source` is `synthetic`)"
    )
    # json: a directory holding one file per client (client_pattern) or one file
    # that `partition` splits over the clients.
    path: str | None = Field(None, description="`json`: a directory of per-client files, or one file to partition")
    client_pattern: str = Field("local_training_{client}.json", description="per-client file names")
    eval_path: str | None = Field(
        None, description="held-out file (default: `global_test.json` beside the client files)"
    )
    partition: Literal["files", "iid", "dirichlet"] = Field(
        "files", description="`files`, `iid`, or `dirichlet` (over `category_field`, `dirichlet_alpha`)"
    )
    category_field: str = Field("category", description="record field that `dirichlet` partitions by")
    dirichlet_alpha: float = Field(
        0.5, gt=0.0, description="Dirichlet concentration of the `dirichlet` partition: small = strongly non-IID"
    )
    max_length: int = Field(128, ge=8, description="tokens per example (prompt truncated first)")
    # Tokenizer for the tiny model (trained locally on the client data); ignored
    # for pretrained models, which bring their own.
    tokenizer_vocab_size: int | None = Field(
        None,
        description=(
            "vocabulary of the locally trained tokenizer (tiny model; pretrained models bring their own); "
            "default: the tiny model's"
        ),
    )

    @model_validator(mode="after")
    def _json_needs_path(self):
        if self.source == "json" and not self.path:
            raise ValueError("data.path is required when data.source is 'json'")
        return self


class TrainConfig(_Section):
    local_steps: int | None = Field(
        10,
        ge=1,
        description=(
            "local optimizer steps per client and round. Set this or `local_epochs`; to use `local_epochs`, leave"
            " `local_steps` unset or null"
        ),
    )
    local_epochs: float | None = Field(
        None, gt=0.0, description="local passes over the client's data per round (rounded up to whole optimizer steps)"
    )
    micro_batch_size: int = Field(8, ge=1, description="DeepSpeed micro-batch size")
    gradient_accumulation_steps: int = Field(1, ge=1, description="DeepSpeed gradient accumulation steps")
    lr: float = Field(3e-3, gt=0.0, description="learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="weight decay")
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="`adamw` or `sgd` (`sgd` with `zero_stage` 0 only); a fresh optimizer per client and round"
    )
    zero_stage: int = Field(0, ge=0, le=2, description="DeepSpeed ZeRO stage 0–2 (each client is its own world of one)")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description=(
        "`bf16` / `fp16` on GPU (with `model.dtype` `bfloat16` / `float16`; bf16 sums the micro-batches' gradients "
        "in fp32, so with `gradient_accumulation_steps` > 1 it needs `zero_stage` ≥ 1). CPU trains in fp32: refused "
        "with `run.device: cpu`, stated in the banner when `auto` finds no GPU"))
    gradient_clipping: float | None = Field(1.0, gt=0.0, description="max gradient norm (null disables)")
    client_engines: Literal["auto", "reuse", "fresh"] = Field(
        "auto",
        description=(
            "How a rank's virtual clients get their LoRA and DeepSpeed engine. 'reuse': one PEFT adapter, "
            "optimizer and engine per (LoRA rank, alpha), reset in place before every client (cheap; needs "
            "zero_stage 0 and no bf16/fp16 engine). 'fresh': a new wrapper and engine per client, removed "
            "and torn down afterwards (returns memory between clients). 'auto': reuse where possible"
        ),
    )
    on_out_of_memory: Literal["error", "exclude"] = Field("error", description=(
        "what a client's local training that runs out of GPU memory does: `error` stops the run with one line "
        "naming the client and what to lower; `exclude` leaves that client out of the round as failed (recorded "
        "in the log's exclusions) and goes on"))
    client_batch: int = Field(
        1,
        description=(
            "G: clients a rank trains together, in one forward/backward of the shared base over their stacked "
            "micro-batches, each client's LoRA on its own rows (README, \"Client batching\"). A rank's clients are "
            "grouped by LoRA rank, alpha and start state, up to G per group; every client gets what training it "
            "alone gives (to float rounding). 1: one client after another. G > 1 needs zero_stage 0, precision "
            "fp32 and client_engines auto or reuse; memory grows with G"
        ),
    )

    @model_validator(mode="after")
    def _one_budget(self):
        if self.local_epochs is not None:
            if self.local_steps is not None and "local_steps" in self.model_fields_set:
                raise ValueError(
                    "train.local_steps and train.local_epochs are both set: keep one (set the other to null)"
                )
            self.__dict__["local_steps"] = None  # the default 10 steps gives way to epochs
        elif self.local_steps is None:
            raise ValueError("no local work: set train.local_steps or train.local_epochs")
        return self

    @field_validator("client_batch")
    @classmethod
    def _positive_batch(cls, value: int) -> int:
        if value < 1:
            raise ValueError(
                "train.client_batch must be at least 1 (1 trains clients one at a time, G > 1 up to G together)"
            )
        return value

    @model_validator(mode="after")
    def _batchable(self):
        """Where DeepSpeed would couple a group's clients, client batching is refused."""
        if self.client_batch == 1:
            return self
        if self.zero_stage != 0:
            raise ValueError(
                f"train.client_batch {self.client_batch} needs train.zero_stage 0: ZeRO 1-2 keep flat fp32 copies "
                "of the weights inside their optimizer and clip by one norm over them, across the group's clients; "
                "set zero_stage: 0 or client_batch: 1"
            )
        if self.precision != "fp32":
            raise ValueError(
                f"train.client_batch {self.client_batch} needs train.precision fp32: DeepSpeed's bf16/fp16 "
                "optimizers clip (and fp16 scales the loss) by one figure across the group's clients; set "
                "precision: fp32 or client_batch: 1"
            )
        if self.client_engines == "fresh":
            raise ValueError(
                f"train.client_batch {self.client_batch} trains a group on one shared engine, but "
                "train.client_engines 'fresh' asks for an engine per client: use 'auto' or client_batch: 1"
            )
        return self

    @model_validator(mode="after")
    def _what_deepspeed_supports(self):
        if self.optimizer == "sgd" and self.zero_stage > 0:
            raise ValueError(
                f"train.optimizer sgd with train.zero_stage {self.zero_stage}: DeepSpeed's ZeRO does not support "
                "torch's SGD (the run would stop at the first client); use train.optimizer: adamw or "
                "train.zero_stage: 0"
            )
        if self.client_engines == "reuse" and (self.zero_stage != 0 or self.precision != "fp32"):
            raise ValueError(
                "train.client_engines 'reuse' needs train.zero_stage 0 and train.precision fp32 "
                "(DeepSpeed keeps its own copies of the weights otherwise): use 'auto' or 'fresh'"
            )
        return self


class EvalConfig(_Section):
    every: int = Field(1, ge=0, description="evaluate the global model every k rounds and after the last (0: never)")
    kind: Literal["loss", "mmlu"] = Field(
        "loss", description="`loss` (held-out loss on response tokens) or `mmlu` (multiple choice by log-likelihood)"
    )
    max_examples: int | None = Field(None, ge=1, description="evaluate on the first this many examples (default: all)")
    batch_size: int = Field(16, ge=1, description="sequences per evaluation forward pass (`mmlu`: 4 per question)")
    path: str | None = Field(None, description="MMLU JSON for `mmlu`, or a Dolly-style file for `loss`")

    @model_validator(mode="after")
    def _mmlu_needs_path(self):
        if self.kind == "mmlu" and not self.path:
            raise ValueError("eval.path is required when eval.kind is 'mmlu'")
        return self


DISTRIBUTION_HINT = (
    "use a number, a list (one per client), {distribution: lognormal, median: M, sigma: S}, "
    "{distribution: uniform, low: L, high: H} or {csv: PATH} (column named like the key)"
)


class LognormalProfile(_Section):
    """Per-client values median · exp(sigma · z), z ~ N(0, 1) drawn from (seed, client)."""

    distribution: Literal["lognormal"] = Field(description="lognormal")
    median: float = Field(gt=0.0, description="median of the per-client values")
    sigma: float = Field(ge=0.0, description="standard deviation of the values' natural logarithm")


class UniformProfile(_Section):
    """Per-client values uniform in [low, high], drawn from (seed, client)."""

    distribution: Literal["uniform"] = Field(description="uniform")
    low: float = Field(description="smallest value")
    high: float = Field(description="largest value")

    @model_validator(mode="after")
    def _ordered(self):
        if self.high < self.low:
            raise ValueError(f"uniform high ({self.high:g}) is below low ({self.low:g}): swap them")
        return self


class CsvProfile(_Section):
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


class SystemConfig(_Section):
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


class LogConfig(_Section):
    client_adapters: bool = Field(
        False, json_schema_extra=CONTRACT, description="also store every client's factors (needed by `sweep-tau`)"
    )


class ExperimentConfig(_Section):
    run: RunConfig = Field(RunConfig(), description="rounds, seed and the log file")
    federation: FederationConfig = Field(FederationConfig(), description="clients, sampling and aggregation")
    model: ModelConfig = Field(ModelConfig(), description="the base model")
    lora: LoraConfig = Field(LoraConfig(), description="the clients' LoRA adapters")
    data: DataConfig = Field(DataConfig(), description="training and held-out data, tokenisation")
    train: TrainConfig = Field(TrainConfig(), description="each client's local training (DeepSpeed)")
    eval: EvalConfig = Field(EvalConfig(), description="evaluation of the global model")
    log: LogConfig = Field(LogConfig(), description="what the HDF5 log stores beyond the defaults")
    system: SystemConfig | None = Field(
        None, description="simulated deployment clock (device speeds, bandwidths, deadline); absent: no simulation"
    )

    @model_validator(mode="after")
    def _cross_checks(self):
        fed, lora = self.federation, self.lora
        if lora.ranks is not None and len(lora.ranks) != fed.num_clients:
            raise ValueError(
                f"lora.ranks has {len(lora.ranks)} entries but federation.num_clients is "
                f"{fed.num_clients}; give one rank per client or use lora.rank"
            )
        if fed.participants_per_round() > fed.num_clients:
            raise ValueError(
                f"federation.clients_per_round ({fed.clients_per_round}) exceeds "
                f"federation.num_clients ({fed.num_clients})"
            )
        if fed.overcommit and self.system is None:
            raise ValueError(
                "federation.overcommit needs a system section: the simulated clock decides which "
                "clients finish first (add system:, see docs/configuration.md, or drop overcommit)"
            )
        if self.system is not None:
            for key, profile in self.system.profiles().items():
                if isinstance(profile, list) and len(profile) != fed.num_clients:
                    raise ValueError(
                        f"system.{key} lists {len(profile)} values but federation.num_clients is "
                        f"{fed.num_clients}: give one value per client"
                    )
        return self

    def to_yaml(self) -> str:
        tree = self.model_dump(mode="json")
        # Keys of the simulated clock are left out when unused, so that logs of runs without
        # it hold the same config text as before the clock existed.
        if tree["system"] is None:
            del tree["system"]
        if tree["federation"]["overcommit"] is None:
            del tree["federation"]["overcommit"]
        # Likewise the device keys at their defaults (a log of a default run reads as before they existed).
        for section, key, default in UNLOGGED_DEFAULTS:
            if tree[section][key] == default:
                del tree[section][key]
        return yaml.safe_dump(tree, sort_keys=False)


# (section, key, default) left out of a logged config at their default (ExperimentConfig.to_yaml)
UNLOGGED_DEFAULTS = (("run", "device", "auto"), ("run", "gpu_memory_fraction", None),
                     ("train", "on_out_of_memory", "error"))


# --------------------------------------------------------------------------- loading


def _apply_override(tree: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set '{assignment}' is not of the form key.path=value")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set '{assignment}' has an empty key")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = raw


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{key}': remove it or check its spelling (docs/configuration.md lists the keys)"
    msg = msg.removeprefix("Value error, ")
    value = first.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
    return f"invalid config value for '{key}'{shown}: {msg}"


def config_from_tree(tree: Any, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError("the config must be a YAML mapping of sections (run:, federation:, ...)")
    tree = copy.deepcopy(tree)
    for assignment in overrides:
        _apply_override(tree, assignment)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def parse_config_text(text: str, overrides=(), source: str = "config") -> ExperimentConfig:
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source} is not valid YAML{where}: fix the syntax") from None
    return config_from_tree(tree, overrides)


def load_config(path: str | Path, overrides=()) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found: pass the path of a YAML config (see configs/)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file '{path}': {err.__class__.__name__}") from None
    return parse_config_text(text, overrides, source=f"config file '{path}'")


# Keys that must match between a log and a config used to resume it.
RESUME_KEYS = (
    "run.seed",
    "federation.num_clients",
    "federation.clients_per_round",
    "federation.method",
    "federation.tau",
    "federation.max_rank",
    "federation.dropout",
    "model",
    "lora",
    "data",
    "train",
    # what the logged eval metric means (eval.every and eval.batch_size may change)
    "eval.kind",
    "eval.path",
    "eval.max_examples",
    # the simulated clock: its figures accumulate over rounds (sim_clock_s)
    "federation.overcommit",
    "system",
)


def _lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _first_difference(a, b, prefix: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            found = _first_difference(a.get(key), b.get(key), f"{prefix}.{key}")
            if found:
                return found
        return None
    return None if a == b else prefix


# Keys inside RESUME_KEYS that may change on resume: they choose how, not what, is computed.
RESUME_FREE = (
    "train.client_engines",  # reused and fresh engines give bitwise-equal clients (tests/test_training.py)
    "train.client_batch",  # grouped clients get what one-at-a-time training gives (tests/test_client_batch.py)
)


def resume_mismatch(logged: ExperimentConfig, current: ExperimentConfig) -> str | None:
    """The first key (dotted) whose value differs in a way that forbids resuming."""
    old, new = logged.model_dump(mode="json"), current.model_dump(mode="json")
    for tree in (old, new):
        for dotted in RESUME_FREE:
            section, _, key = dotted.rpartition(".")
            node = _lookup(tree, section)
            if isinstance(node, dict):
                node.pop(key, None)
    for key in RESUME_KEYS:
        diff = _first_difference(_lookup(old, key), _lookup(new, key), key)
        if diff:
            return diff
    return None
