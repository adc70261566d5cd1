"""A short centralised warm-up of the tiny model (full fine-tuning), and the data it uses.

A randomly initialised model is a poor stand-in for a pretrained one: some plain
language modelling gives LoRA a base that already knows the data's surface statistics.
It trains either on the pooled client data (`model.warmup_data: clients`) or on a share
of every client's records set aside for it (`held_out`), which the clients then never
see, the way a real base model was pretrained on other text than the clients'. With
`model.warmup_text: prompts` it reads only the records' instructions and contexts as
plain text (`instructions`: the instructions alone): a base that has never seen the
instruction template or an answer, which federated instruction tuning then teaches.
Runs once; the result is cached by model.py.
"""
from __future__ import annotations

import torch

from florist_mpi import data as data_lib
from florist_mpi.config import ExperimentConfig
from florist_mpi.errors import UserError

# Without a warm-up, the tiny model's tokenizer learns from the records of at most this many clients
# of per-client data (generated or one file per client): enough text for its vocabulary, and a run
# with many registered clients builds, and caches, the same base as one with this many.
TOKENIZER_CLIENTS = 1000


def _set_aside(cfg: ExperimentConfig) -> data_lib.SetAside | None:
    fraction = cfg.model.reserved_fraction()
    return data_lib.SetAside(fraction, cfg.model.base_seed(cfg.run.seed)) if fraction else None


def client_data(cfg: ExperimentConfig) -> data_lib.ClientData:
    """Every client's federated training records (less the warm-up's share when it is set aside),
    generated clients made when first asked for (data.ClientData)."""
    data = data_lib.ClientData(cfg.data, cfg.federation.num_clients, cfg.run.seed, _set_aside(cfg))
    if data.generated and data.set_aside is not None and data.num_records(0) == cfg.data.synthetic.examples_per_client:
        _nothing_set_aside(cfg.model.reserved_fraction())
    return data


def base_data_clients(cfg: ExperimentConfig) -> int:
    """How many clients' records the tiny base model (its tokenizer, its warm-up) learns from."""
    per_client = cfg.data.source == "synthetic" or cfg.data.partition == "files"
    if per_client and not cfg.model.warmup_steps:
        return min(cfg.federation.num_clients, TOKENIZER_CLIENTS)
    return cfg.federation.num_clients


def training_split(cfg: ExperimentConfig, num_clients: int | None = None) -> tuple[list[list[dict]], list[dict]]:
    """(every client's federated training records, the warm-up's records), of the first `num_clients`
    clients (default: all; per-client data only, where the first clients do not depend on the rest)."""
    set_aside = _set_aside(cfg)
    count = cfg.federation.num_clients if num_clients is None else num_clients
    clients, reserved = data_lib.split_records(cfg.data, count, cfg.run.seed, set_aside)
    if set_aside is None:
        reserved = [record for records in clients for record in records]
    elif not reserved:
        _nothing_set_aside(set_aside.fraction)
    return clients, reserved


def _nothing_set_aside(fraction: float):
    raise UserError(
        f"model.warmup_fraction {fraction} sets no record aside (every client holds fewer than "
        f"{1 / fraction:.0f} records): raise model.warmup_fraction or use model.warmup_data: clients"
    )


def warmup_sequences(records: list[dict], tokenizer, cfg: ExperimentConfig) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) the warm-up models, every token scored: `model.warmup_text` of the records."""
    if cfg.model.warmup_text == "examples":
        encoded = data_lib.encode_records(records, tokenizer, cfg.data.max_length)
        # Language modelling on whole sequences: the prompt is text to learn here too.
        return [(ids, list(ids)) for ids, _ in encoded]
    with_context = cfg.model.warmup_text == "prompts"
    texts = [data_lib.plain_prompt(r, with_context) for r in records]
    # a text that is empty after stripping encodes to bos alone: nothing to predict
    return [pair for pair in data_lib.encode_texts(texts, tokenizer, cfg.data.max_length) if len(pair[0]) > 1]


def warm_up(model, tokenizer, records: list[dict], cfg: ExperimentConfig) -> None:
    """`model.warmup_steps` AdamW steps of language modelling on `records` (`model.warmup_text` of them)."""
    encoded = warmup_sequences(records, tokenizer, cfg)
    if not encoded:
        raise UserError(f"the warm-up has no text to learn ({cfg.model.warmup_text} of the records are empty): "
                        "set model.warmup_text: examples")
    generator = torch.Generator().manual_seed(cfg.model.base_seed(cfg.run.seed))
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
