"""`model` and `lora`: the base model (a Hugging Face one, or the tiny offline one) and the clients' LoRA."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from florist_mpi.config.base import CONTRACT, Section

ALPHA_PER_RANK = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*r\s*$")


class TinyModelConfig(Section):
    vocab_size: int = Field(512, ge=64, description="vocabulary size of the tiny model")
    hidden_size: int = Field(64, ge=8, description="hidden size of the tiny model")
    intermediate_size: int = Field(128, ge=8, description="MLP size of the tiny model")
    num_hidden_layers: int = Field(2, ge=1, description="decoder layers of the tiny model")
    num_attention_heads: int = Field(4, ge=1, description="attention heads of the tiny model")
    max_position_embeddings: int = Field(256, ge=16, description="longest sequence of the tiny model")


class ModelConfig(Section):
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


class LoraConfig(Section):
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
