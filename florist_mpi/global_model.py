"""A rank's copy of the global model: the frozen base plus the global updates merged so far.

Every rank holds one; after every round each merges the same broadcast factors, so their
copies stay bitwise equal (checked by a digest, `check_consistency`). Methods that keep the
base (FlexLoRA, HetLoRA) do not merge: their global model is base + the last global update, which
clients also start from (`client_init`). FedEx-LoRA keeps its update too, but merges the round's
residual into the base, so that base + the kept update is the exact global model. Evaluation of
the global model is split over ranks.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from florist_mpi import comm, evaluation, methods, storage
from florist_mpi import data as data_lib
from florist_mpi.config import ExperimentConfig
from florist_mpi.errors import RanksDiverged
from florist_mpi.faults import diverges
from florist_mpi.model import adapted_modules, float32_masters, merge_update, weights_digest
from florist_mpi.replay import temporarily_merged

GlobalFactors = dict[str, tuple[np.ndarray, np.ndarray]]  # module -> fp32 (B m×r_g, A r_g×n)


class GlobalModel:
    def __init__(self, world, cfg: ExperimentConfig, model, tokenizer, device: torch.device):
        self.world, self.cfg, self.model, self.device = world, cfg, model, device
        self.method = methods.get(cfg.federation.method)
        self.modules = adapted_modules(model, cfg.lora.target_modules)
        self.shapes: dict[str, tuple[int, int]] = {name: tuple(m.weight.shape) for name, m in self.modules.items()}
        self.masters = float32_masters(self.modules)  # merges of bf16/fp16 weights go through fp32
        # the kept global update clients start from (methods that keep the base: FlexLoRA, HetLoRA, FedEx-LoRA)
        self.client_init: GlobalFactors | None = None
        self.eval_set = self._load_eval_shard(tokenizer)

    def _load_eval_shard(self, tokenizer):
        cfg = self.cfg
        if not cfg.eval.every:
            return None
        records = evaluation.shard(evaluation.eval_set_records(cfg), self.world.rank, self.world.size)
        if cfg.eval.kind == "mmlu":
            return evaluation.multiple_choice_items(records, tokenizer, cfg.data.max_length)
        return data_lib.encode_records(records, tokenizer, cfg.data.max_length)

    # ------------------------------------------------------------------ updates

    def apply(self, global_factors: GlobalFactors, residuals: GlobalFactors | None = None) -> None:
        """The round's global update: merged into the base, or kept beside it (FlexLoRA, HetLoRA). FedEx-LoRA
        keeps B @ A beside the base and merges the residual (module -> m×q, q×n factors) into it, so that
        base + B @ A is the exact global model."""
        if residuals:
            merge_update(self.modules, residuals, self.masters)
        if self.method.keeps_base:
            self.client_init = global_factors
        else:
            merge_update(self.modules, global_factors, self.masters)

    def replay(self, handle) -> tuple[GlobalFactors | None, GlobalFactors]:
        """Apply a log's global updates (and residuals) onto the freshly built base (bitwise the run's own
        ops); returns the last global update applied (None when no round had one) and its residuals."""
        factors, residuals = None, {}
        for round_index in storage.completed_rounds(handle):
            if storage.round_is_empty(handle, round_index):
                continue  # no client was aggregated: the global model stayed as it was
            logged = storage.read_global_factors(handle, round_index)
            factors = {name: logged[name] for name in self.shapes}  # model order
            logged = storage.read_residual_factors(handle, round_index)
            residuals = {name: logged[name] for name in self.shapes if name in logged}
            self.apply(factors, residuals)
        return factors, residuals

    def check_consistency(self, round_index: int) -> None:
        """Every rank's adapted weights must be bitwise equal after a merge (a cheap digest)."""
        if diverges(round_index, self.world.rank):
            with torch.no_grad():
                next(iter(self.modules.values())).weight.view(-1)[0] += 1e-3
        digest = weights_digest(self.modules)
        if self.world.size == 1:
            return
        digests = comm.gather_digests(self.world, digest)
        verdict = None
        if self.world.is_root:
            differing = [rank for rank, d in enumerate(digests) if d != digests[0]]
            if differing:
                verdict = f"base weights differ between rank 0 and ranks {differing} after round {round_index}"
        verdict = comm.root_verdict(self.world, verdict)
        if verdict:
            raise RanksDiverged(verdict)

    # --------------------------------------------------------------- evaluation

    def evaluate(self) -> tuple[float, float]:
        """(held-out loss, MMLU accuracy) of the global model, split over ranks; NaN where not measured."""
        if self.eval_set is None:
            return math.nan, math.nan
        if self.method.keeps_base and self.client_init is not None:
            # the base is kept (FlexLoRA, HetLoRA, FedEx-LoRA): the global model is base + the kept global update
            with temporarily_merged(self.modules, self.client_init, self.masters):
                return self._evaluate_model()
        return self._evaluate_model()

    def _evaluate_model(self) -> tuple[float, float]:
        self.model.eval()  # local training left the shared base in train mode (dropout on)
        world = self.world
        if self.cfg.eval.kind == "mmlu":
            correct, total = evaluation.multiple_choice_correct(self.model, self.eval_set, self.device,
                                                                self.cfg.eval.batch_size)
            if world.size > 1:
                correct, total = comm.allreduce_sum(world, np.array([correct, total]))
            return math.nan, float(correct) / float(total) if total else math.nan
        total, count = evaluation.loss_sums(self.model, self.eval_set, self.cfg.eval.batch_size, self.device)
        if world.size > 1:
            total, count = comm.allreduce_sum(world, np.array([total, count]))
        return evaluation.mean_loss(float(total), int(count)), math.nan
