"""The prompt template and the local tokenizer (a byte-level BPE trained on the data)."""
from __future__ import annotations

import math
from pathlib import Path

from florist_mpi.data.common import DataError

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
# Training text for the tokenizer is capped so that building it stays fast on large data.
TOKENIZER_TEXT_BUDGET = 4_000_000  # characters


def format_prompt(record: dict) -> str:
    """The prompt (everything before the response), Alpaca/Dolly style."""
    instruction = record["instruction"].strip()
    context = (record.get("context") or "").strip()
    if context:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def format_example(record: dict) -> str:
    return format_prompt(record) + record["response"]


def _tokenizer_training_texts(records: list[dict]) -> list[str]:
    """Formatted texts; on large data an evenly strided subset, so every client is represented."""
    texts = [format_example(record) for record in records]
    total = sum(map(len, texts))
    stride = max(1, math.ceil(total / TOKENIZER_TEXT_BUDGET))
    return texts[::stride]


def build_tokenizer(records: list[dict], vocab_size: int):
    """A byte-level BPE tokenizer trained on the records; deterministic; at most `vocab_size` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    room = vocab_size - len(SPECIAL_TOKENS)
    if room < 1:
        raise DataError(f"tokenizer vocabulary {vocab_size} is too small: use at least {len(SPECIAL_TOKENS) + 1}")
    # With room for all 256 bytes any text is encodable; a smaller vocabulary keeps only
    # the most frequent characters (others become <unk>), so the bound always holds.
    if room >= len(byte_alphabet):
        alphabet = {"initial_alphabet": byte_alphabet}
    else:
        alphabet = {"limit_alphabet": room}
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False, **alphabet)
    tokenizer.train_from_iterator(_tokenizer_training_texts(records), trainer)
    return _wrap_tokenizer(tokenizer)


def _wrap_tokenizer(tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    tokenizer.save_pretrained(str(directory))


def load_tokenizer(directory: str | Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
