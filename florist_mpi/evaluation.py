"""Evaluating the global model: held-out loss and MMLU-style multiple choice.

Both are split over ranks by example index and reduced as sums, so the result
does not depend on the number of ranks beyond float summation order.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from florist_mpi import data as data_lib
from florist_mpi.config import ExperimentConfig
from florist_mpi.errors import UserError

CHOICE_LETTERS = ("A", "B", "C", "D")
ANSWER_PATTERN = re.compile(r"answer is:?\s*\(?([A-D])\b")
# The end of every multiple-choice prompt; the answer letter follows it after a space.
ANSWER_CUE = "The answer is:"


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
    """Per question: the four (input_ids, labels) candidates and the index of the gold one.

    Every candidate is the same prompt (the question, then ANSWER_CUE) followed by one
    answer letter; only the letter's tokens are labelled (no EOS), so a candidate's score
    is log P(letter | prompt). Records without a parsable gold letter are skipped.
    """
    items = []
    for record in records:
        gold = gold_letter(record)
        if gold is None:
            continue
        prompt, letters = _prompt_and_letter_ids(tokenizer, data_lib.format_prompt(record) + ANSWER_CUE)
        room = max(map(len, letters))  # the same prompt cut for every candidate
        candidates = [data_lib.encode_pair(tokenizer, prompt, ids, max_length, eos=False, answer_room=room)
                      for ids in letters]
        items.append((candidates, CHOICE_LETTERS.index(gold)))
    return items


def _prompt_and_letter_ids(tokenizer, prompt_text: str) -> tuple[list[int], list[list[int]]]:
    """(shared prompt ids, each letter's ids) from tokenising prompt + " X" whole.

    Tokenising the whole text keeps each candidate exactly as the tokenizer would see it;
    the prompt is the longest prefix the four share, so it is scored identically for all
    (a merge across the boundary at most moves a shared token, e.g. a space, to the
    letters, which adds the same term to every score).
    """
    whole = tokenizer([f"{prompt_text} {letter}" for letter in CHOICE_LETTERS], add_special_tokens=False)["input_ids"]
    shared = 0
    shortest = min(map(len, whole))
    while shared < shortest - 1 and len({ids[shared] for ids in whole}) == 1:
        shared += 1
    return list(whole[0][:shared]), [list(ids[shared:]) for ids in whole]


@torch.no_grad()
def multiple_choice_scores(model, items, device: torch.device, batch_size: int = 4) -> list[torch.Tensor]:
    """Per question: each candidate's summed log-probability of its labelled (answer) tokens.

    Candidates of max(1, batch_size // 4) questions share one forward pass, right-padded to the
    longest: a position's logits depend only on the positions before it, so padding changes nothing.
    """
    pad_id = model.config.pad_token_id or 0
    per_batch = max(1, batch_size // len(CHOICE_LETTERS))
    scores = []
    for start in range(0, len(items), per_batch):
        chunk = items[start : start + per_batch]
        candidates = [candidate for question, _ in chunk for candidate in question]
        batch = data_lib.collate(candidates, pad_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        mask = labels != data_lib.IGNORE_INDEX
        picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        summed = (picked * mask).sum(dim=1).cpu()  # one score per candidate, question after question
        offsets = [0]
        for question, _ in chunk:
            offsets.append(offsets[-1] + len(question))
        scores.extend(summed[a:b] for a, b in zip(offsets, offsets[1:]))
    return scores


def multiple_choice_correct(model, items, device: torch.device, batch_size: int = 4) -> tuple[int, int]:
    """(correct, total): the letter with the highest log-likelihood wins (`batch_size` sequences per pass)."""
    scores = multiple_choice_scores(model, items, device, batch_size)
    correct = sum(int(int(s.argmax()) == gold) for s, (_, gold) in zip(scores, items))
    return correct, len(items)


def mean_loss(total: float, count: int) -> float:
    return total / count if count else math.nan


def perplexity(loss: float) -> float:
    return float(np.exp(loss)) if np.isfinite(loss) else math.nan


def eval_set_records(cfg: ExperimentConfig) -> list[dict]:
    """The run's evaluation examples: eval.path (MMLU or JSON), else the held-out split; eval.max_examples cut."""
    if cfg.eval.kind == "mmlu" or cfg.eval.path:
        records = data_lib.load_json_records(Path(cfg.eval.path))
    else:
        records = data_lib.eval_records(cfg.data, cfg.run.seed)
    if cfg.eval.max_examples:
        records = records[: cfg.eval.max_examples]
    if not records:
        raise UserError("the evaluation set is empty: point eval.path at a file with examples or set eval.every: 0")
    return records
