"""`run`, `eval` and `log`: rounds, seed, device and output; evaluation; what the log stores."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from florist_mpi.config.base import CONTRACT, Section


class RunConfig(Section):
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




class EvalConfig(Section):
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




class LogConfig(Section):
    client_adapters: bool = Field(
        False,
        json_schema_extra=CONTRACT,
        description="also store every client's factors (needed by `sweep-tau` and `compare-methods`)",
    )
