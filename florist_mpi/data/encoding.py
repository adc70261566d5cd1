"""Encoding records into (input ids, labels) and batching them for training."""
from __future__ import annotations

import torch

from florist_mpi.data.common import DataError
from florist_mpi.data.text import format_prompt

IGNORE_INDEX = -100  # label value the cross-entropy loss skips


def _fit_lengths(prompt_len: int, answer_len: int, budget: int) -> tuple[int, int]:
    """Tokens kept of (prompt, answer) within `budget`.

    The prompt gives way first, but keeps at least half the budget (or all of itself):
    an answer without its instruction teaches nothing. Then the answer loses its end.
    """
    if prompt_len + answer_len <= budget:
        return prompt_len, answer_len
    prompt_keep = max(min(prompt_len, budget // 2), budget - answer_len)
    return prompt_keep, budget - prompt_keep


def _middle_cut(ids: list[int], keep: int) -> list[int]:
    """Keep the start (the instruction) and the end (the last input and the response marker)."""
    if keep >= len(ids):
        return ids
    tail = (keep + 1) // 2
    return ids[: keep - tail] + ids[len(ids) - tail :]


def special_ids(tokenizer) -> tuple[list[int], list[int]]:
    """([bos], [eos]) of the tokenizer; an empty list for one it does not have."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return bos, eos


def encode_pair(
    tokenizer,
    prompt_ids: list[int],
    answer_ids: list[int],
    max_length: int,
    *,
    eos: bool = True,
    answer_room: int | None = None,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of bos + prompt + answer (+ eos), at most max_length tokens.

    labels are -100 on bos and the prompt, so only the answer (and eos) is scored.
    Truncation follows _fit_lengths and _middle_cut. `answer_room` (default: this
    answer's length) is the answer length the prompt makes room for: candidates of one
    question pass their longest, so every candidate keeps exactly the same prompt.
    """
    bos, end = special_ids(tokenizer)
    prompt = bos + list(prompt_ids)
    answer = list(answer_ids) + (end if eos else [])
    room = len(answer) if answer_room is None else answer_room + (len(end) if eos else 0)
    prompt_keep, _ = _fit_lengths(len(prompt), max(room, len(answer)), max_length)
    prompt = _middle_cut(prompt, prompt_keep)
    answer = answer[: max_length - len(prompt)]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def encode_records(records: list[dict], tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per record: bos + prompt + response + eos, at most max_length tokens.

    labels are -100 on bos and prompt tokens, so the loss is on the response (and eos) only.
    """
    if not records:
        return []
    prompts = tokenizer([format_prompt(r) for r in records], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r["response"] for r in records], add_special_tokens=False)["input_ids"]
    return [encode_pair(tokenizer, prompt, response, max_length) for prompt, response in zip(prompts, responses)]


def plain_prompt(record: dict, with_context: bool = True) -> str:
    """A record's instruction (and context) as plain text: no template, no response."""
    context = (record.get("context") or "").strip() if with_context else ""
    return "\n".join(part for part in (record["instruction"].strip(), context) if part)


def encode_texts(texts: list[str], tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of bos + text, at most max_length tokens, every token scored (language modelling)."""
    if not texts:
        return []
    bos, _ = special_ids(tokenizer)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    sequences = [(bos + list(ids))[:max_length] for ids in encoded]
    return [(ids, list(ids)) for ids in sequences]


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding)."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, row_labels) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sample_batches(encoded, batch_size: int, num_batches: int, generator: torch.Generator) -> list[list[int]]:
    """Indices of `num_batches` full batches drawn from back-to-back shuffled epochs.

    Every example appears once per pass before any repeats; a batch may straddle two
    passes. The order depends only on the generator's state.
    """
    count = len(encoded)
    if count == 0:
        raise DataError("no training examples to sample batches from: check the client's data")
    needed = batch_size * num_batches
    order: list[int] = []
    while len(order) < needed:
        order.extend(torch.randperm(count, generator=generator).tolist())
    return [order[start : start + batch_size] for start in range(0, needed, batch_size)]
