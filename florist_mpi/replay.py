"""Rebuilding a run's models offline, from its log alone (no training, one process).

The base weights after round r are the initial base plus the logged global updates
of rounds 0..r (FlexLoRA never merges: its global model is base + that round's update).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from florist_mpi import storage
from florist_mpi.config import ExperimentConfig, parse_config_text


def logged_config(log_path) -> ExperimentConfig:
    with storage.open_log(log_path) as handle:
        return parse_config_text(storage.decode_str(handle.attrs["config"]), source=f"log '{log_path}'")


def load_initial_base(cfg: ExperimentConfig, device: torch.device | None = None):
    """The run's starting model and tokenizer, exactly as the run built them."""
    from florist_mpi import comm
    from florist_mpi.model import load_base, quiet_libraries

    quiet_libraries()
    return load_base(cfg, comm.init_world(), device or torch.device("cpu"))


def merge_rounds_before(model_modules, log_path, cfg: ExperimentConfig, round_index: int) -> None:
    """Apply the logged global updates of rounds < round_index (nothing for FlexLoRA)."""
    from florist_mpi.model import merge_update

    if cfg.federation.method == "flexlora":
        return
    with storage.open_log(log_path) as handle:
        for r in storage.completed_rounds(handle):
            if r < round_index:
                merge_update(model_modules, storage.read_global_factors(handle, r))


@contextmanager
def temporarily_merged(model_modules, factors, masters=None):
    """base + B @ A inside the block; the exact previous weights afterwards.

    Weights kept in lower precision are merged through (copies of) their fp32 `masters`,
    as a real merge would be.
    """
    from florist_mpi.model import merge_update

    saved = {name: model_modules[name].weight.detach().clone() for name in factors}
    merge_update(model_modules, factors, {name: masters[name].clone() for name in factors if name in (masters or {})})
    try:
        yield
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                model_modules[name].weight.copy_(weight)


class Evaluator:
    """The run's own evaluation (held-out loss or MMLU accuracy), on one process."""

    def __init__(self, cfg: ExperimentConfig, model, tokenizer, device: torch.device | None = None):
        from florist_mpi import data as data_lib
        from florist_mpi import evaluation
        from florist_mpi.runner import _eval_records

        self.cfg, self.model, self.device = cfg, model, device or torch.device("cpu")
        records = _eval_records(cfg)
        if cfg.eval.kind == "mmlu":
            self.items = evaluation.multiple_choice_items(records, tokenizer, cfg.data.max_length)
        else:
            self.items = data_lib.encode_records(records, tokenizer, cfg.data.max_length)

    def __call__(self) -> tuple[float, float]:
        """(eval loss, accuracy); the one that does not apply is NaN."""
        from florist_mpi import evaluation

        if self.cfg.eval.kind == "mmlu":
            correct, total = evaluation.multiple_choice_correct(self.model, self.items, self.device)
            return math.nan, correct / total if total else math.nan
        total, count = evaluation.loss_sums(self.model, self.items, self.cfg.eval.batch_size, self.device)
        return evaluation.mean_loss(total, count), math.nan
