"""Evaluating the global model: held-out loss and MMLU-style multiple choice.

Both are split over ranks by example index and reduced as sums, so the result
does not depend on the number of ranks beyond float summation order.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch

from florist_mpi import data as data_lib

CHOICE_LETTERS = ("A", "B", "C", "D")
ANSWER_PATTERN = re.compile(r"answer is:?\s*\(?([A-D])\b")


def shard(items: list, rank: int, size: int) -> list:
    return items[rank::size]


@torch.no_grad()
def loss_sums(model, encoded, batch_size: int, device: torch.device) -> tuple[float, int]:
    """(sum of token losses over response tokens, number of those tokens)."""
    pad_id = model.config.pad_token_id or 0
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = data_lib.collate(encoded[start : start + batch_size], pad_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        token_losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(token_losses)
        count += int((labels != -100).sum())
    return total, count


def gold_letter(record: dict) -> str | None:
    match = ANSWER_PATTERN.search(record.get("response", ""))
    return match.group(1) if match else None


def multiple_choice_items(records: list[dict], tokenizer, max_length: int):
    """Per question: the four (input_ids, labels) candidates and the index of the gold one."""
    items = []
    for record in records:
        gold = gold_letter(record)
        if gold is None:
            continue
        candidates = [dict(record, response=f"The answer is: {letter}") for letter in CHOICE_LETTERS]
        items.append((data_lib.encode_records(candidates, tokenizer, max_length), CHOICE_LETTERS.index(gold)))
    return items


@torch.no_grad()
def multiple_choice_correct(model, items, device: torch.device) -> tuple[int, int]:
    """(correct, total): the option with the highest log-likelihood of its answer tokens wins."""
    pad_id = model.config.pad_token_id or 0
    correct = 0
    for candidates, gold in items:
        batch = data_lib.collate(candidates, pad_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        mask = labels != -100
        picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores = (picked * mask).sum(dim=1)
        correct += int(int(scores.argmax()) == gold)
    return correct, len(items)


def mean_loss(total: float, count: int) -> float:
    return total / count if count else math.nan


def perplexity(loss: float) -> float:
    return float(np.exp(loss)) if np.isfinite(loss) else math.nan
