"""Client batching (`train.client_batch: G`): a rank's clients trained up to G at a time.

A group is up to G clients of one LoRA rank, alpha and start state (fresh LoRA, FlexLoRA's
carried-over truncation, FFA-LoRA's frozen A). Each micro-batch step runs the shared frozen
base once over the group's stacked micro-batches, each client's adapter on its own rows
(grouped_lora.GroupedLora), in one DeepSpeed engine over the group's stacked adapter
parameters. What keeps the clients apart (README, "Many clients: client batching"):

- DeepSpeed: a private torch.distributed world of one (training.isolate_torch_distributed),
  ZeRO stage 0 and fp32 (config validation refuses the rest), its own gradient clipping off.
- Loss: each client's is the model's causal-LM loss of its rows cut back to its own length (the
  mean over its own tokens); the step minimises their sum, so each client's gradient is its own.
- Clipping: per client, by that client's own gradient norm (DeepSpeed's rule), before the step.
- Optimizer: Adam/AdamW/SGD are elementwise, so one over the stacked (G, ...) tensors is one per
  client; every client of a group starts together, so the shared step count is each client's.
- Start: each client's LoRA is drawn from its own seed exactly as a fresh PEFT wrapper draws
  it, and its dropout masks continue that generator state (bitwise the sequential path's).
- Padding: attention runs per client at its own length (grouped_attention), and a client's
  weight gradients sum over its own positions only, so the group's extra padding never shows.
- Clients with fewer local micro-batches leave the group when done: their factors and loss are
  taken after their last step, and their rows leave the batch.

Each client's factors and loss equal the one-at-a-time path's to float rounding (bitwise on
the development machine; tests/test_client_batch.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from florist_mpi import data as data_lib
from florist_mpi.config import ExperimentConfig
from florist_mpi.errors import UserError
from florist_mpi.exchange import ClientUpdate
from florist_mpi.grouped_attention import per_client_attention
from florist_mpi.grouped_lora import GroupedLora, RowLayout, default_generator
from florist_mpi.seeding import Stream, derive_seed
from florist_mpi.training import (
    ClientJob,
    ClientTrainingError,
    build_engine,
    build_optimizer,
    clear_training_state,
    client_update,
    fresh_lora_A,
    local_batches,
    start_factors_,
)


def own_dropout(model: nn.Module) -> float:
    """The largest dropout probability the base model itself applies in training (its nn.Dropout modules,
    its attention dropout); LoRA's own dropout is not part of the base."""
    rates = [module.p for module in model.modules() if isinstance(module, nn.Dropout)]
    rates.append(float(getattr(model.config, "attention_dropout", 0.0) or 0.0))
    return max(rates)


def seed_generators(seed: int, device: torch.device) -> None:
    """torch.manual_seed(seed) for the generators a client's training draws from: the CPU one (its LoRA
    init) and its device's (its dropout masks), without queueing seeds for every other device."""
    torch.default_generator.manual_seed(seed)
    if device.type != "cpu":
        default_generator(device).manual_seed(seed)


def group_key(job: ClientJob) -> tuple:
    """Clients that can share a group: same LoRA rank, alpha and start state."""
    return job.rank, float(job.alpha), job.init_factors is not None, job.frozen_A is not None


def form_groups(jobs: list[ClientJob], batches: dict[int, int], size: int) -> list[list[ClientJob]]:
    """Jobs split into groups of at most `size` with one group_key; within a key, clients with as many
    local micro-batches as possible share a group (most first, then by id), so few leave early."""
    by_key: dict[tuple, list[ClientJob]] = {}
    for job in jobs:
        by_key.setdefault(group_key(job), []).append(job)
    groups = []
    for members in by_key.values():
        members.sort(key=lambda job: (-batches[job.client_id], job.client_id))
        groups.extend(members[start : start + size] for start in range(0, len(members), size))
    return groups


def per_client_loss(model: nn.Module, logits: torch.Tensor, labels: list[torch.Tensor]) -> torch.Tensor:
    """(clients,) each client's loss: the model's own causal-LM loss (HF's `loss_function`, the mean over
    the client's labelled tokens) of its rows cut back to its own padded length, as the one-at-a-time
    path computes it, so the group's extra padding never enters a loss.

    logits (clients·b, L, V), client-major; labels[j] (b, L_j) the j-th client's own labels.
    """
    blocks = logits.split(labels[0].shape[0])  # client by client: each slice's backward stays that size
    return torch.stack([model.loss_function(logits=block[:, : own.shape[1]].contiguous(), labels=own,
                                            vocab_size=model.config.vocab_size)
                        for block, own in zip(blocks, labels)])


def stack_batches(batches: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Client micro-batches (each right-padded to its own longest example) right-padded to the group's
    longest and stacked client-major; the extra padding has attention mask 0."""
    width = max(batch["input_ids"].shape[1] for batch in batches)
    fill = {"input_ids": pad_id, "attention_mask": 0}
    return {key: torch.cat([F.pad(batch[key], (0, width - batch[key].shape[1]), value=value) for batch in batches])
            for key, value in fill.items()}


class _GroupModel(nn.Module):
    """What the group's DeepSpeed engine wraps: the stacked adapters as its only parameters, and a
    forward that runs the shared base (held outside the module tree) with them attached."""

    def __init__(self, base_model: nn.Module, lora: GroupedLora):
        super().__init__()
        self.lora = lora
        self._base = (base_model,)  # a tuple: not a submodule, so the engine never sees the base weights

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        base = self._base[0]
        with self.lora.attached(base), per_client_attention(base, self.lora.layout):
            return base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@dataclass
class _GroupSlot:
    """One engine over `lora`'s stacked parameters, shared by the groups of one (rank, alpha, frozen A)."""

    lora: GroupedLora
    optimizer: torch.optim.Optimizer
    engine: object


@dataclass
class _Progress:
    """A group member's local work: its micro-batches, the losses so far, and its result when done."""

    job: ClientJob
    batches: list[list[int]]
    losses: list[float]
    result: ClientUpdate | Exception | None = None


class GroupTrainer:
    """Trains a rank's clients in groups of up to `group_size` on the rank's shared base model.

    Each (LoRA rank, alpha, frozen A) gets one GroupedLora with `slots` = min(group_size, the
    federation's clients of that rank and alpha) slots, its optimizer and DeepSpeed engine, built
    when first needed and reused by every later group: before each group the slots are redrawn
    from the clients' seeds and the optimizer state and engine counters cleared.
    """

    def __init__(self, base_model: nn.Module, shapes: dict[str, tuple[int, int]], cfg: ExperimentConfig,
                 device: torch.device, group_size: int):
        rate = own_dropout(base_model)
        if rate > 0:
            raise UserError(
                f"train.client_batch {cfg.train.client_batch} needs a base model without dropout of its own (this "
                f"one drops with p = {rate:g} in training): its masks would be drawn for the whole group, not per "
                "client; set train.client_batch: 1"
            )
        self.base_model, self.cfg, self.device, self.group_size = base_model, cfg, device, group_size
        order = [name for name, _ in base_model.named_modules() if name in shapes]  # forward (model) order
        self.shapes = {name: tuple(shapes[name]) for name in order}
        self._slots: dict[tuple, _GroupSlot] = {}
        pad_id = base_model.config.pad_token_id
        self.pad_id = 0 if pad_id is None else pad_id

    def train(self, jobs: list[ClientJob], progress=None) -> dict[int, ClientUpdate | Exception]:
        """client id -> its update, or the recoverable error (ClientTrainingError, out of memory) it failed with;
        `progress(done)`, if given, is told how many clients are done after each group."""
        plans = {job.client_id: local_batches(self.cfg, job.encoded, job.round_index, job.client_id) for job in jobs}
        results: dict[int, ClientUpdate | Exception] = {}
        for group in form_groups(jobs, {c: len(b) for c, b in plans.items()}, self.group_size):
            results.update(self._train_group(group, plans))
            if progress is not None:
                progress(len(results))
        return results

    # ------------------------------------------------------------------ one group

    def _train_group(self, group: list[ClientJob], plans: dict[int, list[list[int]]]) -> dict:
        slot = self._slot(group[0])
        members = [_Progress(job, plans[job.client_id], []) for job in group]
        try:
            self._start(slot.lora, group)
            self.base_model.train()  # as engine.train() sets the one-at-a-time path's wrapper
            for step in range(max(len(m.batches) for m in members)):
                self._step(slot, members, step)
        except torch.OutOfMemoryError as err:
            for member in members:
                member.result = member.result or err
        finally:
            clear_training_state(slot)
        return {member.job.client_id: member.result for member in members}

    def _start(self, lora: GroupedLora, group: list[ClientJob]) -> None:
        """Every slot's starting factors: for slot j, group[j]'s LoRA as a fresh PEFT wrapper draws it from
        the client's seed (then the method's start); unused slots hold zeros."""
        with torch.no_grad():
            for A, B in zip(lora.A, lora.B):
                A.zero_()
                B.zero_()
        for j, job in enumerate(group):
            seed_generators(derive_seed(self.cfg.run.seed, job.round_index, job.client_id, Stream.LORA_INIT),
                            self.device)
            for name, (A, B) in lora.factors(j).items():
                A.copy_(fresh_lora_A(*A.shape, B.shape[0]))
                start_factors_(A, B, name, job, lora.scaling)
            if lora.dropout is not None:
                lora.dropout.start(j)  # its masks continue from here, as the global generator would

    def _step(self, slot: _GroupSlot, members: list[_Progress], step: int) -> None:
        """One micro-batch of every member that still has one: forward, per-client losses, backward,
        and at an accumulation boundary per-client clipping and the optimizer step."""
        active = [j for j, member in enumerate(members) if step < len(member.batches)]
        batches = [data_lib.collate([members[j].job.encoded[i] for i in members[j].batches[step]], self.pad_id)
                   for j in active]
        batch = {key: value.to(self.device) for key, value in stack_batches(batches, self.pad_id).items()}
        layout = RowLayout(self.cfg.train.micro_batch_size, tuple(b["input_ids"].shape[1] for b in batches),
                           tuple(not bool(b["attention_mask"].all()) for b in batches))
        slot.lora.set_rows(active, layout)
        engine = slot.engine
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        losses = per_client_loss(self.base_model, logits, [b["labels"].to(self.device) for b in batches])
        engine.backward(losses.sum())  # d(sum)/d(loss_g) = 1: each client's gradient is its own
        if engine.is_gradient_accumulation_boundary() and self.cfg.train.gradient_clipping:
            slot.lora.clip_per_client_(self.cfg.train.gradient_clipping)
        engine.step()
        for j, loss in zip(active, losses.detach().cpu().tolist()):
            member = members[j]
            member.losses.append(loss)
            if len(member.losses) == len(member.batches):  # its last micro-batch: done, leaves the group
                member.result = self._finish(slot.lora, j, member)

    def _finish(self, lora: GroupedLora, j: int, member: _Progress) -> ClientUpdate | Exception:
        factors = {name: ((B.float() * lora.scaling).cpu().numpy().copy(), A.float().cpu().numpy().copy())
                   for name, (A, B) in lora.factors(j).items()}
        try:
            return client_update(member.job, factors, float(np.mean(member.losses)))
        except ClientTrainingError as err:
            return err

    # ------------------------------------------------------------------ engines

    def _slot(self, job: ClientJob) -> _GroupSlot:
        key = (job.rank, float(job.alpha), job.frozen_A is not None)
        if key not in self._slots:
            lora = GroupedLora(self.shapes, self._capacity(job), job.rank, job.alpha / job.rank,
                               self.cfg.lora.dropout, self.device, train_A=job.frozen_A is None)
            optimizer = build_optimizer([p for p in lora.parameters() if p.requires_grad], self.cfg.train)
            # DeepSpeed's own clipping would take one norm across the group: off, clipped per client instead
            unclipped = self.cfg.train.model_copy(update={"gradient_clipping": None})
            engine = build_engine(_GroupModel(self.base_model, lora), optimizer, unclipped, self.device)
            if engine.optimizer is not optimizer or engine.gradient_clipping():
                raise RuntimeError("DeepSpeed wrapped the optimizer of a client group, or clips across its clients: "
                                   "set train.client_batch: 1")
            self._slots[key] = _GroupSlot(lora, optimizer, engine)
        return self._slots[key]

    def _capacity(self, job: ClientJob) -> int:
        """Slots of a group of this rank and alpha: G, or fewer when the federation has fewer such clients."""
        lora = self.cfg.lora
        same = sum(1 for c in range(self.cfg.federation.num_clients)
                   if lora.rank_of(c) == job.rank and math.isclose(lora.alpha_of(c), job.alpha))
        return max(1, min(self.group_size, same))

