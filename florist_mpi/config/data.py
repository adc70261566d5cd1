"""`data`: training and held-out data, tokenisation."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from florist_mpi.config.base import Section


class SyntheticDataConfig(Section):
    tasks: list[str] = Field(["reverse", "sort", "add", "copy", "count", "upper"], description="generated tasks")
    examples_per_client: int = Field(256, ge=1, description="generated training examples per client")
    eval_examples: int = Field(256, ge=1, description="generated held-out examples")
    # Dirichlet concentration of each client's task mix: small = strongly non-IID.
    concentration: float = Field(
        0.3, gt=0.0, description="each client's task mix ~ Dirichlet(concentration): small = strongly non-IID"
    )


class DataConfig(Section):
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
