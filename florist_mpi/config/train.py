"""`train`: each client's local training in its DeepSpeed engine."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from florist_mpi.config.base import Section


class TrainConfig(Section):
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
