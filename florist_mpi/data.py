"""Instruction data: loading, federated splits, the local tokenizer, encoding, batching.

Records are Dolly-style dicts with string fields `instruction`, `context`, `response` and
`category`. Every split and every generated example is a pure function of (config, number
of clients, run seed), so each MPI rank computes the same data without communicating.

The offline default (`data.source: synthetic`) generates small algorithmic tasks
(reverse, sort, add, ...) that a tiny randomly initialised model learns within a few dozen
steps; each client's task mix is drawn from a Dirichlet distribution, which makes the
federation non-IID the same way category splits of real instruction data do.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np
import torch

from florist_mpi.config import DataConfig, SyntheticDataConfig

IGNORE_INDEX = -100  # label value the cross-entropy loss skips
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
EVAL_FILE_NAME = "global_test.json"
DEFAULT_CATEGORY = "none"
# Training text for the tokenizer is capped so that building it stays fast on large data.
TOKENIZER_TEXT_BUDGET = 4_000_000  # characters


class DataError(ValueError):
    """A user-facing data problem; the message is one line naming the file/field and the fix."""


class _Stream(IntEnum):
    """SeedSequence tags of this module's random streams (part of the reproducibility contract)."""

    SYNTHETIC_CLIENT = 101
    SYNTHETIC_EVAL = 102
    PARTITION = 103
    SET_ASIDE = 104


@dataclass(frozen=True)
class SetAside:
    """A share of the training data kept away from the clients (the tiny base model's warm-up data).

    Chosen from its own seed, not the run's, so runs that share a base model share its data too.
    """

    fraction: float
    seed: int


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(value) for value in entropy]))


# ==================================================================== public entry points


def client_records(cfg: DataConfig, num_clients: int, seed: int) -> list[list[dict]]:
    """Training records of every client, index = client id; deterministic in the arguments only."""
    return split_records(cfg, num_clients, seed)[0]


class ClientData(Sequence):
    """Every client's training records (index = client id), as a run reads them.

    Files are read at once (a partition needs every record); generated clients are made when
    first asked for, each from (seed, client) alone, and forgotten again, so a run with 100,000
    registered clients that samples 1,000 per round generates what it samples, and start-up does
    not grow with the registered clients. Either way `data[k]` is what `split_records` gives
    client k, and `num_records(k)` its count (for generated clients, without generating them).
    """

    def __init__(self, cfg: DataConfig, num_clients: int, seed: int, set_aside: SetAside | None = None):
        self.cfg, self.num_clients, self.seed, self.set_aside = cfg, num_clients, seed, set_aside
        self._loaded = None if cfg.source == "synthetic" else split_records(cfg, num_clients, seed, set_aside)[0]

    def __len__(self) -> int:
        return self.num_clients

    def __getitem__(self, client):
        if isinstance(client, slice):
            return [self[k] for k in range(*client.indices(self.num_clients))]
        if not -self.num_clients <= client < self.num_clients:
            raise IndexError(f"client {client} is not one of the {self.num_clients} clients")
        client %= self.num_clients
        if self._loaded is not None:
            return self._loaded[client]
        records = synthetic_client_records(self.cfg.synthetic, client, self.seed)
        return _set_aside_per_client([records], self.set_aside, first_client=client)[0][0]

    def num_records(self, client: int) -> int:
        """Training records of one client (after the set-aside)."""
        if self._loaded is not None:
            return len(self._loaded[client])
        count = self.cfg.synthetic.examples_per_client
        if self.set_aside is None:
            return count
        return count - _set_aside_count(count, self.set_aside.fraction)

    @property
    def generated(self) -> bool:
        """True when clients are made on demand (no file to check: every client has records)."""
        return self._loaded is None


def split_records(
    cfg: DataConfig, num_clients: int, seed: int, set_aside: SetAside | None = None
) -> tuple[list[list[dict]], list[dict]]:
    """(every client's training records, the records set aside from them: empty without `set_aside`).

    Per-client data (files, generated) loses `fraction` of every client's records, at most all
    but one; a single file to partition loses `fraction` of its records before the partition.
    """
    if cfg.source == "synthetic":
        clients = [synthetic_client_records(cfg.synthetic, client, seed) for client in range(num_clients)]
        return _set_aside_per_client(clients, set_aside)
    path = Path(cfg.path)
    if cfg.partition == "files":
        clients = _client_files(path, cfg.client_pattern, num_clients, cfg.category_field)
        return _set_aside_per_client(clients, set_aside)
    records = load_json_records(path, cfg.category_field)
    reserved: list[dict] = []
    if set_aside is not None:
        keep, aside = _set_aside_indices(len(records), set_aside.fraction, _rng(set_aside.seed, _Stream.SET_ASIDE))
        records, reserved = [records[i] for i in keep], [records[i] for i in aside]
    return _partition(cfg, records, num_clients, seed, path), reserved


def _set_aside_count(count: int, fraction: float) -> int:
    """Records set aside of `count`: floor(count · fraction), at most count - 1, so something is kept."""
    return max(0, min(count - 1, math.floor(count * fraction + 1e-9)))


def _set_aside_indices(count: int, fraction: float, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(kept, set-aside) indices in record order; at most count - 1 set aside, so something is kept."""
    order = rng.permutation(count)
    cut = _set_aside_count(count, fraction)
    return sorted(int(i) for i in order[cut:]), sorted(int(i) for i in order[:cut])


def _set_aside_per_client(
    clients: list[list[dict]], set_aside: SetAside | None, first_client: int = 0
) -> tuple[list[list[dict]], list[dict]]:
    """Each client's share set aside, from (set-aside seed, client) alone; clients[i] is client first_client + i."""
    if set_aside is None:
        return clients, []
    kept_clients, reserved = [], []
    for client, records in enumerate(clients, start=first_client):
        rng = _rng(set_aside.seed, _Stream.SET_ASIDE, client + 1)
        keep, aside = _set_aside_indices(len(records), set_aside.fraction, rng)
        kept_clients.append([records[i] for i in keep])
        reserved.extend(records[i] for i in aside)
    return kept_clients, reserved


def _partition(cfg: DataConfig, records: list[dict], num_clients: int, seed: int, path: Path) -> list[list[dict]]:
    if cfg.partition == "iid":
        groups = iid_partition(len(records), num_clients, seed)
    else:
        categories = [record["category"] for record in records]
        groups = dirichlet_partition(categories, num_clients, cfg.dirichlet_alpha, seed)
    _require_nonempty_clients(groups, path)
    return [[records[i] for i in indices] for indices in groups]


def eval_records(cfg: DataConfig, seed: int) -> list[dict]:
    """Held-out records: a balanced synthetic task mix, or the json held-out file."""
    if cfg.source == "synthetic":
        return synthetic_eval_records(cfg.synthetic, seed)
    return load_json_records(_eval_path(cfg), cfg.category_field)


def epochs_to_batches(num_examples: int, batch_size: int, epochs: float) -> int:
    """Batches needed to see `num_examples` `epochs` times; at least one."""
    # The epsilon keeps float noise (100 * 0.3 = 30.000000000000004) from adding a batch.
    return max(1, math.ceil(num_examples * epochs / batch_size - 1e-9))


# ==================================================================== synthetic tasks

WORDS = (
    "cat dog sun moon tree fish bird star rain snow leaf rock milk bread apple lamp "
    "door book ship road king frog wolf bear cake rose wind fire gold salt seed hill"
).split()


def _words(rng: np.random.Generator, low: int, high: int) -> list[str]:
    return [WORDS[i] for i in rng.integers(0, len(WORDS), size=int(rng.integers(low, high + 1)))]


def _reverse(rng):
    words = _words(rng, 3, 6)
    return "Reverse the order of the words.", " ".join(words), " ".join(reversed(words))


def _sort(rng):
    numbers = [int(n) for n in rng.integers(0, 100, size=int(rng.integers(3, 7)))]
    return (
        "Sort the numbers from smallest to largest.",
        " ".join(map(str, numbers)),
        " ".join(map(str, sorted(numbers))),
    )


def _add(rng):
    a, b = (int(n) for n in rng.integers(0, 50, size=2))
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


def _copy(rng):
    text = " ".join(_words(rng, 3, 6))
    return "Copy the text exactly.", text, text


def _count(rng):
    words = _words(rng, 1, 9)
    return "Count the words in the list.", " ".join(words), str(len(words))


def _upper(rng):
    word = WORDS[int(rng.integers(0, len(WORDS)))]
    return "Write the word in capital letters.", word, word.upper()


# Each task has one fixed instruction, so the instruction alone tells the model the task.
TASKS: dict[str, Callable[[np.random.Generator], tuple[str, str, str]]] = {
    "reverse": _reverse,
    "sort": _sort,
    "add": _add,
    "copy": _copy,
    "count": _count,
    "upper": _upper,
}


def _task_generators(tasks: list[str]) -> list[Callable]:
    unknown = [name for name in tasks if name not in TASKS]
    if unknown or not tasks:
        what = f"unknown task(s) {', '.join(map(repr, unknown))}" if unknown else "no tasks"
        raise DataError(f"data.synthetic.tasks has {what}: choose from {', '.join(TASKS)}")
    return [TASKS[name] for name in tasks]


def _synthetic_record(task: str, generator: Callable, rng: np.random.Generator) -> dict:
    instruction, context, response = generator(rng)
    return {"instruction": instruction, "context": context, "response": response, "category": task}


def synthetic_client_records(cfg: SyntheticDataConfig, client_id: int, seed: int) -> list[dict]:
    """One client's examples; its task mix ~ Dirichlet(concentration) (small = non-IID)."""
    generators = _task_generators(cfg.tasks)
    rng = _rng(seed, client_id, _Stream.SYNTHETIC_CLIENT)
    mix = rng.dirichlet(np.full(len(generators), cfg.concentration))
    picks = rng.choice(len(generators), size=cfg.examples_per_client, p=mix)
    return [_synthetic_record(cfg.tasks[t], generators[t], rng) for t in picks]


def synthetic_eval_records(cfg: SyntheticDataConfig, seed: int) -> list[dict]:
    """Held-out examples cycling through the tasks, so any prefix is a balanced mix."""
    generators = _task_generators(cfg.tasks)
    rng = _rng(seed, _Stream.SYNTHETIC_EVAL)
    count = len(generators)
    return [_synthetic_record(cfg.tasks[i % count], generators[i % count], rng) for i in range(cfg.eval_examples)]


# ==================================================================== JSON files


def load_json_records(path: str | Path, category_field: str = "category") -> list[dict]:
    """Records of a JSON array or JSON Lines file, normalised to the Dolly fields.

    Alpaca names are accepted (`input` for `context`, `output` for `response`); the category
    comes from `category_field`, else `category`, else `class` (MMLU), else "none".
    An empty list is returned as is; callers decide whether that is an error.
    """
    path = Path(path)
    values = _parse_records_text(_read_text(path), path)
    return [_normalise_record(value, index, path, category_field) for index, value in enumerate(values)]


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"data file '{path}' not found: check the path (relative paths start at the working directory)")
    if not path.is_file():
        raise DataError(f"'{path}' is a directory, not a data file: point at a .json/.jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"data file '{path}' is not UTF-8 text: re-save it as UTF-8 JSON") from None
    except OSError as err:
        raise DataError(f"cannot read data file '{path}' ({err.strerror}): check its permissions") from None
    if not text.strip():
        raise DataError(f"data file '{path}' is empty: fill it with a JSON list of records or JSON Lines")
    return text


def _looks_like_json_lines(text: str) -> bool:
    """JSON Lines: the first line alone is a complete JSON object."""
    first_line = text.lstrip().split("\n", 1)[0]
    try:
        return isinstance(json.loads(first_line), dict)
    except json.JSONDecodeError:
        return False


def _parse_records_text(text: str, path: Path) -> list:
    if _looks_like_json_lines(text):
        return _parse_json_lines(text, path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"data file '{path}' is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}; "
            "fix the syntax there"
        ) from None
    if not isinstance(value, list):
        raise DataError(
            f"data file '{path}' holds a JSON {_json_type(value)} at the top level: it must be a list of "
            'records ([{"instruction": ..., "response": ...}, ...]) or JSON Lines'
        )
    return value


def _parse_json_lines(text: str, path: Path) -> list:
    values = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(
                f"data file '{path}' (JSON Lines) is not valid JSON at line {line_number}, column {err.colno}: "
                f"{err.msg}; fix that line"
            ) from None
    return values


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _field(raw: dict, names: tuple[str, ...]) -> tuple[str, object]:
    """(name, value) of the first of `names` the record sets; value None if none is set."""
    for name in names:
        if raw.get(name) is not None:
            return name, raw[name]
    return names[0], None


def _normalise_record(raw, index: int, path: Path, category_field: str) -> dict:
    """The four Dolly fields of record `index` (0-based), or a DataError naming what is wrong."""
    if not isinstance(raw, dict):
        raise DataError(
            f"data file '{path}': record {index} is a JSON {_json_type(raw)}, not an object: "
            "every record must be an object with 'instruction' and 'response' fields"
        )
    sources = {
        "instruction": ("instruction",),
        "context": ("context", "input"),
        "response": ("response", "output"),
        "category": (category_field, "category", "class"),
    }
    record = {}
    for field, names in sources.items():
        name, value = _field(raw, names)
        if value is None and field in ("instruction", "response"):
            alias = f" (or its alias '{names[1]}')" if len(names) > 1 else ""
            raise DataError(f"data file '{path}': record {index} has no '{field}' field{alias}: add it to that record")
        if value is not None and not isinstance(value, str):
            raise DataError(
                f"data file '{path}': record {index} field '{name}' is a JSON {_json_type(value)}: make it a string"
            )
        record[field] = value if value is not None else ("" if field == "context" else DEFAULT_CATEGORY)
    return record


def _client_files(directory: Path, pattern: str, num_clients: int, category_field: str) -> list[list[dict]]:
    if not directory.is_dir():
        what = "is a file" if directory.exists() else "not found"
        raise DataError(
            f"data.path '{directory}' {what}: with data.partition 'files' it must be a directory holding "
            f"{pattern.format(client=0)} ... (or set data.partition to iid/dirichlet for one file)"
        )
    clients = []
    for client in range(num_clients):
        path = directory / pattern.format(client=client)
        if not path.is_file():
            raise DataError(
                f"client file '{path}' not found: {directory} must hold one file per client for "
                f"{num_clients} clients; add it or lower federation.num_clients"
            )
        records = load_json_records(path, category_field)
        if not records:
            raise DataError(f"client {client} has no examples: '{path}' is an empty list; add records to it")
        clients.append(records)
    return clients


def _eval_path(cfg: DataConfig) -> Path:
    if cfg.eval_path:
        return Path(cfg.eval_path)
    data_path = Path(cfg.path)
    folder = data_path if data_path.is_dir() else data_path.parent
    candidate = folder / EVAL_FILE_NAME
    if candidate.is_file():
        return candidate
    raise DataError(
        f"no held-out data for data.path '{cfg.path}': set data.eval_path (or eval.path) to a JSON file "
        f"or put {EVAL_FILE_NAME} in '{folder}'"
    )


# ==================================================================== partitioners


def iid_partition(num_records: int, num_clients: int, seed: int) -> list[list[int]]:
    """Record indices per client: a seeded shuffle split into near-equal parts."""
    order = _rng(seed, _Stream.PARTITION).permutation(num_records)
    return [sorted(int(i) for i in part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(categories: list[str], num_clients: int, alpha: float, seed: int) -> list[list[int]]:
    """Record indices per client: each category's records split by proportions ~ Dirichlet(alpha).

    Small alpha concentrates a category on few clients (non-IID). Clients left empty get
    one record from the largest client, so every client trains whenever possible.
    """
    rng = _rng(seed, _Stream.PARTITION)
    by_category: dict[str, list[int]] = {}
    for index, category in enumerate(categories):
        by_category.setdefault(category, []).append(index)
    groups: list[list[int]] = [[] for _ in range(num_clients)]
    for category in sorted(by_category):  # sorted: independent of the file's category order
        indices = rng.permutation(by_category[category])
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
        for client, part in enumerate(np.split(indices, cuts)):
            groups[client].extend(int(i) for i in part)
    _fill_empty_clients(groups)
    return [sorted(group) for group in groups]


def _fill_empty_clients(groups: list[list[int]]) -> None:
    for group in groups:
        if group:
            continue
        donor = max(groups, key=len)  # first of the largest: deterministic
        if len(donor) < 2:
            return  # fewer records than clients: reported by the caller
        group.append(donor.pop())


def _require_nonempty_clients(groups: list[list[int]], path: Path) -> None:
    total = sum(map(len, groups))
    for client, group in enumerate(groups):
        if not group:
            raise DataError(
                f"client {client} gets no examples: '{path}' has {total} records for {len(groups)} clients; "
                "add records or lower federation.num_clients"
            )


# ==================================================================== tokenizer


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


# ==================================================================== encoding & batching


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


# ==================================================================== system profiles (CSV)


def system_tables(system, num_clients: int) -> dict[str, np.ndarray]:
    """The columns of `system` keys given as {csv: PATH}: key -> float64 value per client.

    The file has a header row and one row per client, client 0 first; the column is named
    like the key (or `column:`). Values must be positive (`latency_s`: zero or positive).
    """
    import csv

    from florist_mpi.config import PROFILE_KEYS, CsvProfile

    tables = {}
    for key in PROFILE_KEYS:
        spec = getattr(system, key)
        if not isinstance(spec, CsvProfile):
            continue
        path, column = Path(spec.csv), spec.column or key
        where = f"system.{key}: CSV '{path}'"
        if not path.is_file():
            raise DataError(f"{where} not found: give the path of a CSV file with one row per client")
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
                header = rows[0].keys() if rows else []
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise DataError(f"{where} cannot be read ({err.__class__.__name__}): check the file") from None
        if rows and column not in header:
            raise DataError(
                f"{where} has no column '{column}' (columns: {', '.join(header)}): add it or set system.{key}.column"
            )
        if len(rows) != num_clients:
            raise DataError(
                f"{where} has {len(rows)} rows but federation.num_clients is {num_clients}: "
                "give one row per client (after the header)"
            )
        values = np.empty(num_clients)
        for index, row in enumerate(rows):
            text = (row.get(column) or "").strip()
            try:
                values[index] = float(text)
            except ValueError:
                raise DataError(f"{where} row {index + 2}: '{text}' in column '{column}' is not a number") from None
            low_ok = values[index] >= 0 if key == "latency_s" else values[index] > 0
            if not (math.isfinite(values[index]) and low_ok):
                need = "zero or positive" if key == "latency_s" else "positive"
                raise DataError(f"{where} row {index + 2}: {column} = {text} must be {need}")
        tables[key] = values
    return tables
