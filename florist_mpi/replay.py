"""Rebuilding a run's models offline, from its log alone (no training, one process).

The base weights after round r are the initial base plus the logged global updates
of rounds 0..r (FlexLoRA and HetLoRA never merge: their global model is base + that round's
update; FedEx-LoRA merges only each round's residual, `global/<module>/residual_{B,A}`, and
its global model is that base + the round's B @ A).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Mapping

import torch

from florist_mpi import methods, storage
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


def merge_rounds_before(model_modules, log_path, cfg: ExperimentConfig, round_index: int) -> dict:
    """Apply the logged global updates of rounds < round_index (methods that keep the base: nothing, but
    FedEx-LoRA's residuals, which it merged into the base).

    Returns the fp32 masters of weights stored in 16 bits (see model.float32_masters),
    which later temporary merges must go through, as the run's own merges did.
    """
    from florist_mpi.model import float32_masters, merge_update

    masters = float32_masters(model_modules)
    method = methods.get(cfg.federation.method)
    if method.keeps_base and not method.folds_residual:
        return masters
    with storage.open_log(log_path) as handle:
        for r in storage.completed_rounds(handle):
            if r < round_index:
                # FedEx-LoRA merged each round's residual into the base and kept B @ A beside it
                merge_update(model_modules, storage.read_residual_factors(handle, r), masters)
                if not method.keeps_base:
                    merge_update(model_modules, storage.read_global_factors(handle, r), masters)
    return masters


@contextmanager
def temporarily_merged(model_modules, factors, masters=None):
    """base + B @ A inside the block; the exact previous weights afterwards.

    A weight kept in 16 bits becomes the rounding of its fp32 master + B @ A, as a merge
    makes it; the masters themselves stay unchanged.
    """
    from florist_mpi.model import merge_update, update_matrix

    saved = {name: model_modules[name].weight.detach().clone() for name in factors}
    with torch.no_grad():
        for name, (B, A) in factors.items():
            weight = model_modules[name].weight
            if masters and name in masters and B.shape[1]:
                weight.copy_(masters[name] + update_matrix(B, A, weight.device))
            else:
                merge_update(model_modules, {name: (B, A)})
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

        self.cfg, self.model, self.device = cfg, model, device or torch.device("cpu")
        records = evaluation.eval_set_records(cfg)
        if cfg.eval.kind == "mmlu":
            self.items = evaluation.multiple_choice_items(records, tokenizer, cfg.data.max_length)
        else:
            self.items = data_lib.encode_records(records, tokenizer, cfg.data.max_length)

    def __call__(self) -> tuple[float, float]:
        """(eval loss, accuracy); the one that does not apply is NaN."""
        from florist_mpi import evaluation

        if self.cfg.eval.kind == "mmlu":
            correct, total = evaluation.multiple_choice_correct(self.model, self.items, self.device,
                                                                self.cfg.eval.batch_size)
            return math.nan, correct / total if total else math.nan
        total, count = evaluation.loss_sums(self.model, self.items, self.cfg.eval.batch_size, self.device)
        return evaluation.mean_loss(total, count), math.nan


def evaluate_updates(log_path, round_index: int, updates: Iterable[Mapping], device: str | None = None,
                     ) -> list[tuple[float, float]]:
    """(eval loss, accuracy) of each global model base + update, evaluated as the run evaluated (one process).

    The base is the run's base before `round_index` (the initial base plus the logged updates of the
    earlier rounds; the initial base for methods that keep it); each update (module -> (B, A), B @ A
    the module's ΔW) is merged into it in turn and taken out again. `device`: auto, cuda or cpu
    (default: the run's run.device). Used by `sweep-tau --eval` (one update per τ) and
    `compare-methods --eval` (one per method and τ).
    """
    from florist_mpi.devices import select_device
    from florist_mpi.model import adapted_modules

    cfg = logged_config(log_path)
    where = select_device(0, device or cfg.run.device, setting="the --eval device", fix="pass --device cpu (or auto)")
    model, tokenizer = load_initial_base(cfg, where)
    modules = adapted_modules(model, cfg.lora.target_modules)
    masters = merge_rounds_before(modules, log_path, cfg, round_index)
    evaluate = Evaluator(cfg, model, tokenizer, where)
    results = []
    for factors in updates:
        with temporarily_merged(modules, factors, masters):
            results.append(evaluate())
    return results
