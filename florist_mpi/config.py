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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    rounds: int = Field(5, ge=1)
    seed: int = Field(0, ge=0)
    output: str = "runs/run.h5"


class FederationConfig(_Section):
    num_clients: int = Field(8, ge=1)
    # An int is a count of clients per round, a float in (0, 1] a fraction of them.
    clients_per_round: int | float | None = None
    method: str = Field(
        "florist", description="aggregation method: a name in the florist_mpi.methods registry (see README.md)"
    )
    tau: float = Field(0.9, gt=0.0, le=1.0)
    max_rank: int | None = Field(None, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    overcommit: float | None = Field(
        None, ge=0.0,
        description="sample this fraction more clients per round and aggregate the first clients_per_round "
                    "to finish on the simulated clock (needs a system section); the rest are stragglers")
    aggregation: Literal["root", "sharded"] = Field(
        "root",
        description="where aggregation runs: 'root' (rank 0 gathers every client's factors and aggregates "
                    "all modules) or 'sharded' (each module has an owner rank that receives only that "
                    "module's client factors and aggregates it; same results, memory and work spread "
                    "over the ranks)",
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
    vocab_size: int = Field(512, ge=64)
    hidden_size: int = Field(64, ge=8)
    intermediate_size: int = Field(128, ge=8)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    max_position_embeddings: int = Field(256, ge=16)


class ModelConfig(_Section):
    # "tiny" builds a small Llama-style model locally; anything else is a
    # Hugging Face id or a local directory loaded with from_pretrained.
    name: str = "tiny"
    tiny: TinyModelConfig = TinyModelConfig()
    # Centralised full fine-tuning steps on the pooled training data before
    # federation starts (tiny model only); the result is cached.
    warmup_steps: int = Field(0, ge=0)
    warmup_lr: float = Field(3e-3, gt=0.0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


class LoraConfig(_Section):
    rank: int = Field(8, ge=1)
    ranks: list[int] | None = None
    # A number, or "<k>r" for alpha = k * rank (the paper's alpha = 2r).
    alpha: float | str = 16.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "v_proj"]

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
    tasks: list[str] = ["reverse", "sort", "add", "copy", "count", "upper"]
    examples_per_client: int = Field(256, ge=1)
    eval_examples: int = Field(256, ge=1)
    # Dirichlet concentration of each client's task mix: small = strongly non-IID.
    concentration: float = Field(0.3, gt=0.0)


class DataConfig(_Section):
    source: Literal["synthetic", "json"] = "synthetic"
    synthetic: SyntheticDataConfig = SyntheticDataConfig()
    # json: a directory holding one file per client (client_pattern) or one file
    # that `partition` splits over the clients.
    path: str | None = None
    client_pattern: str = "local_training_{client}.json"
    eval_path: str | None = None
    partition: Literal["files", "iid", "dirichlet"] = "files"
    category_field: str = "category"
    dirichlet_alpha: float = Field(0.5, gt=0.0)
    max_length: int = Field(128, ge=8)
    # Tokenizer for the tiny model (trained locally on the client data); ignored
    # for pretrained models, which bring their own.
    tokenizer_vocab_size: int | None = None

    @model_validator(mode="after")
    def _json_needs_path(self):
        if self.source == "json" and not self.path:
            raise ValueError("data.path is required when data.source is 'json'")
        return self


class TrainConfig(_Section):
    local_steps: int | None = Field(10, ge=1)
    local_epochs: float | None = Field(None, gt=0.0)
    micro_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    zero_stage: int = Field(0, ge=0, le=2)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_clipping: float | None = Field(1.0, gt=0.0)
    client_engines: Literal["auto", "reuse", "fresh"] = Field(
        "auto",
        description=(
            "How a rank's virtual clients get their LoRA and DeepSpeed engine. 'reuse': one PEFT adapter, "
            "optimizer and engine per (LoRA rank, alpha), reset in place before every client (cheap; needs "
            "zero_stage 0 and no bf16/fp16 engine). 'fresh': a new wrapper and engine per client, removed "
            "and garbage-collected afterwards (returns memory between clients). 'auto': reuse where possible"
        ),
    )

    @model_validator(mode="after")
    def _one_budget(self):
        if self.local_epochs is not None:
            if self.local_steps is not None and "local_steps" in self.model_fields_set:
                raise ValueError("train.local_steps and train.local_epochs are both set: keep one "
                                 "(set the other to null)")
            self.__dict__["local_steps"] = None  # the default 10 steps gives way to epochs
        elif self.local_steps is None:
            raise ValueError("no local work: set train.local_steps or train.local_epochs")
        return self

    @model_validator(mode="after")
    def _reusable_engines(self):
        if self.client_engines == "reuse" and (self.zero_stage != 0 or self.precision != "fp32"):
            raise ValueError("train.client_engines 'reuse' needs train.zero_stage 0 and train.precision fp32 "
                             "(DeepSpeed keeps its own copies of the weights otherwise): use 'auto' or 'fresh'")
        return self


class EvalConfig(_Section):
    every: int = Field(1, ge=0)  # 0 disables evaluation
    kind: Literal["loss", "mmlu"] = "loss"
    max_examples: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    path: str | None = None  # mmlu JSON, or Dolly-style JSON for held-out loss

    @model_validator(mode="after")
    def _mmlu_needs_path(self):
        if self.kind == "mmlu" and not self.path:
            raise ValueError("eval.path is required when eval.kind is 'mmlu'")
        return self


DISTRIBUTION_HINT = ("use a number, a list (one per client), {distribution: lognormal, median: M, sigma: S}, "
                     "{distribution: uniform, low: L, high: H} or {csv: PATH} (column named like the key)")


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
        1.0, description="device speed relative to the reference device (1.0 = reference_flops); > 0")
    downlink_mbps: Profile = Field(100.0, description="server-to-client bandwidth in Mbit/s (10^6 bit/s); > 0")
    uplink_mbps: Profile = Field(20.0, description="client-to-server bandwidth in Mbit/s (10^6 bit/s); > 0")
    latency_s: Profile = Field(0.05, description="fixed cost of each transfer in seconds; >= 0")
    deadline_s: float | None = Field(
        None, gt=0.0, description="a client whose download + compute + upload exceeds this many simulated "
                                  "seconds is a straggler, left out of aggregation")
    reference_flops: float = Field(
        1.0e12, gt=0.0, description="sustained training throughput (FLOP/s) of the reference device, "
                                    "compute_speed 1.0")
    server_flops: float = Field(
        1.0e13, gt=0.0, description="sustained throughput (FLOP/s) of the aggregation server")

    @field_validator("compute_speed", "downlink_mbps", "uplink_mbps", "latency_s", mode="before")
    @classmethod
    def _profiles(cls, value, info):
        return _profile_value(value, info.field_name, positive=info.field_name != "latency_s")

    def profiles(self) -> dict[str, Profile]:
        return {key: getattr(self, key) for key in PROFILE_KEYS}


PROFILE_KEYS = ("compute_speed", "downlink_mbps", "uplink_mbps", "latency_s")


class LogConfig(_Section):
    client_adapters: bool = False


class ExperimentConfig(_Section):
    run: RunConfig = RunConfig()
    federation: FederationConfig = FederationConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()
    system: SystemConfig | None = Field(
        None, description="simulated deployment clock (device speeds, bandwidths, deadline); absent: no simulation")

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
            raise ValueError("federation.overcommit needs a system section: the simulated clock decides which "
                             "clients finish first (add system:, see docs/configuration.md, or drop overcommit)")
        if self.system is not None:
            for key, profile in self.system.profiles().items():
                if isinstance(profile, list) and len(profile) != fed.num_clients:
                    raise ValueError(f"system.{key} lists {len(profile)} values but federation.num_clients is "
                                     f"{fed.num_clients}: give one value per client")
        return self

    def to_yaml(self) -> str:
        tree = self.model_dump(mode="json")
        # Keys of the simulated clock are left out when unused, so that logs of runs without
        # it hold the same config text as before the clock existed.
        if tree["system"] is None:
            del tree["system"]
        if tree["federation"]["overcommit"] is None:
            del tree["federation"]["overcommit"]
        return yaml.safe_dump(tree, sort_keys=False)


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


def resume_mismatch(logged: ExperimentConfig, current: ExperimentConfig) -> str | None:
    """The first key (dotted) whose value differs in a way that forbids resuming."""
    old, new = logged.model_dump(mode="json"), current.model_dump(mode="json")
    for key in RESUME_KEYS:
        diff = _first_difference(_lookup(old, key), _lookup(new, key), key)
        if diff:
            return diff
    return None
