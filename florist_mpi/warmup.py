"""A short centralised warm-up of the tiny model (full fine-tuning on pooled data).

A randomly initialised model is a poor stand-in for a pretrained one: a few
hundred steps of plain language modelling give LoRA a base that already knows
the data's surface statistics. Runs once; the result is cached by model.py.
"""
from __future__ import annotations

import torch

from florist_mpi import data as data_lib
from florist_mpi.config import ExperimentConfig


def warm_up(model, tokenizer, records: list[dict], cfg: ExperimentConfig) -> None:
    encoded = data_lib.encode_records(records, tokenizer, cfg.data.max_length)
    # Language modelling on whole sequences: the prompt is text to learn here too.
    encoded = [(ids, list(ids)) for ids, _ in encoded]
    generator = torch.Generator().manual_seed(cfg.run.seed)
    batches = data_lib.sample_batches(encoded, cfg.train.micro_batch_size, cfg.model.warmup_steps, generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.model.warmup_lr)
    model.train()
    for indices in batches:
        batch = data_lib.collate([encoded[i] for i in indices], tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
