"""Data module: synthetic tasks, JSON loading and splits, tokenizer, encoding, batching."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from florist_mpi import data
from florist_mpi.config import DataConfig, SyntheticDataConfig
from florist_mpi.data import DataError

DOLLY = Path(__file__).resolve().parents[2] / "shared/data/dolly-8clients"
DOLLY_SIZES = [1579, 685, 3775, 1830, 2152, 1776, 2531, 607]


def synthetic_cfg(**synthetic) -> DataConfig:
    return DataConfig(synthetic=SyntheticDataConfig(**synthetic))


def make_records(count: int, categories=("a", "b", "c")) -> list[dict]:
    return [
        {
            "instruction": f"question {i}",
            "context": "",
            "response": f"answer {i}",
            "category": categories[i % len(categories)],
        }
        for i in range(count)
    ]


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def json_cfg(path: Path, **fields) -> DataConfig:
    return DataConfig(source="json", path=str(path), **fields)


@pytest.fixture(scope="module")
def synthetic_tokenizer():
    records = [r for client in data.client_records(synthetic_cfg(examples_per_client=64), 4, 0) for r in client]
    return data.build_tokenizer(records, 512)


# ------------------------------------------------------------------ synthetic data


def test_synthetic_clients_are_deterministic_in_the_seed():
    cfg = synthetic_cfg(examples_per_client=32)
    first = data.client_records(cfg, 4, seed=7)
    assert first == data.client_records(cfg, 4, seed=7)
    assert first != data.client_records(cfg, 4, seed=8)
    assert [len(client) for client in first] == [32] * 4


def test_synthetic_client_does_not_depend_on_the_number_of_clients():
    cfg = synthetic_cfg(examples_per_client=16)
    assert data.client_records(cfg, 2, seed=1) == data.client_records(cfg, 5, seed=1)[:2]


def test_synthetic_clients_are_non_iid():
    cfg = synthetic_cfg(examples_per_client=200, concentration=0.3)
    histograms = [Counter(r["category"] for r in client) for client in data.client_records(cfg, 6, seed=0)]
    assert all(set(h) <= set(cfg.synthetic.tasks) for h in histograms)
    dominant = [h.most_common(1)[0][0] for h in histograms]
    assert len(set(dominant)) > 1
    assert len({tuple(sorted(h.items())) for h in histograms}) == 6


@pytest.mark.parametrize("task", list(data.TASKS))
def test_synthetic_answers_are_correct(task):
    records = data.client_records(synthetic_cfg(tasks=[task], examples_per_client=50), 1, seed=3)[0]
    for record in records:
        words, response = record["context"].split(), record["response"]
        assert record["category"] == task and record["instruction"]
        expected = {
            "reverse": lambda: " ".join(reversed(words)),
            "sort": lambda: " ".join(map(str, sorted(map(int, words)))),
            "add": lambda: str(int(words[0]) + int(words[2])),
            "copy": lambda: record["context"],
            "count": lambda: str(len(words)),
            "upper": lambda: record["context"].upper(),
        }[task]()
        assert response == expected


def test_synthetic_eval_is_balanced_and_differs_from_training():
    cfg = synthetic_cfg(eval_examples=60)
    held_out = data.eval_records(cfg, seed=0)
    assert held_out == data.eval_records(cfg, seed=0)
    assert len(held_out) == 60
    assert set(Counter(r["category"] for r in held_out).values()) == {10}
    assert held_out[:20] != data.client_records(cfg, 1, seed=0)[0][:20]


def test_unknown_synthetic_task_lists_the_valid_names():
    with pytest.raises(DataError, match=r"'bogus'.*reverse, sort, add, copy, count, upper"):
        data.client_records(synthetic_cfg(tasks=["reverse", "bogus"]), 2, seed=0)


def test_synthetic_examples_fit_max_length(synthetic_tokenizer):
    held_out = data.eval_records(synthetic_cfg(eval_examples=120), seed=5)
    encoded = data.encode_records(held_out, synthetic_tokenizer, 128)
    assert max(len(ids) for ids, _ in encoded) < 64


# ------------------------------------------------------------------ prompt, tokenizer, encoding


def test_format_prompt_has_input_block_only_with_context():
    with_context = {"instruction": "Do it.", "context": "the text", "response": "done"}
    assert data.format_prompt(with_context) == "### Instruction:\nDo it.\n\n### Input:\nthe text\n\n### Response:\n"
    assert data.format_prompt(dict(with_context, context="")) == "### Instruction:\nDo it.\n\n### Response:\n"


def test_tokenizer_is_deterministic_bounded_and_has_special_tokens(synthetic_tokenizer):
    records = [r for client in data.client_records(synthetic_cfg(examples_per_client=64), 4, 0) for r in client]
    again = data.build_tokenizer(records, 512)
    assert again.get_vocab() == synthetic_tokenizer.get_vocab()
    assert len(synthetic_tokenizer) <= 512
    for name, token in (("pad", "<pad>"), ("bos", "<s>"), ("eos", "</s>"), ("unk", "<unk>")):
        assert getattr(synthetic_tokenizer, f"{name}_token") == token
        assert getattr(synthetic_tokenizer, f"{name}_token_id") is not None
    text = data.format_example(records[0])
    assert synthetic_tokenizer.decode(synthetic_tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_small_tokenizer_vocabulary_stays_within_bound():
    records = data.client_records(synthetic_cfg(examples_per_client=32), 2, 0)[0]
    assert len(data.build_tokenizer(records, 64)) <= 64


def test_tokenizer_save_and_load_round_trip(synthetic_tokenizer, tmp_path):
    data.save_tokenizer(synthetic_tokenizer, tmp_path / "tok")
    loaded = data.load_tokenizer(tmp_path / "tok")
    assert loaded.get_vocab() == synthetic_tokenizer.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (
        synthetic_tokenizer.pad_token_id,
        synthetic_tokenizer.bos_token_id,
        synthetic_tokenizer.eos_token_id,
    )


def test_encode_masks_exactly_the_prompt(synthetic_tokenizer):
    tok = synthetic_tokenizer
    record = {"instruction": "Reverse the order of the words.", "context": "cat dog sun", "response": "sun dog cat"}
    [(ids, labels)] = data.encode_records([record], tok, 128)
    prompt = tok(data.format_prompt(record), add_special_tokens=False)["input_ids"]
    response = tok(record["response"], add_special_tokens=False)["input_ids"]
    assert ids == [tok.bos_token_id] + prompt + response + [tok.eos_token_id]
    assert labels == [-100] * (1 + len(prompt)) + response + [tok.eos_token_id]


def test_truncation_cuts_the_prompt_and_keeps_the_response(synthetic_tokenizer):
    tok = synthetic_tokenizer
    record = {"instruction": "Copy the text exactly.", "context": " ".join(["cat dog"] * 200), "response": "bird fish"}
    [(ids, labels)] = data.encode_records([record], tok, 48)
    answer = [label for label in labels if label != -100]
    assert len(ids) == len(labels) == 48
    assert answer == tok("bird fish", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    text = tok.decode(ids)
    assert text.startswith("<s>### Instruction:\nCopy the text exactly.")  # instruction kept
    assert text.endswith("\n\n### Response:\nbird fish</s>")  # response marker kept


def test_truncation_of_a_long_response_keeps_half_the_prompt(synthetic_tokenizer):
    tok = synthetic_tokenizer
    record = {
        "instruction": "Copy the text exactly.",
        "context": " ".join(["cat dog"] * 40),
        "response": " ".join(["sun"] * 200),
    }
    [(ids, labels)] = data.encode_records([record], tok, 64)
    assert len(ids) == 64
    assert labels[:32] == [-100] * 32 and -100 not in labels[32:]


def test_encode_pair_without_eos_and_with_a_shared_prompt_cut(synthetic_tokenizer):
    tok = synthetic_tokenizer
    prompt = list(range(10, 50))  # 40 prompt ids
    ids, labels = data.encode_pair(tok, prompt, [7], 128, eos=False)
    assert ids == [tok.bos_token_id] + prompt + [7] and labels == [-100] * 41 + [7]
    # within 24 tokens: bos + prompt middle-cut to 23 tokens (11 from the start, 12 from the end), no eos
    short, _ = data.encode_pair(tok, prompt, [7], 24, eos=False)
    assert short == [tok.bos_token_id] + prompt[:10] + prompt[-12:] + [7]
    # candidates of different lengths keep one prompt when they share answer_room (the longest)
    one, _ = data.encode_pair(tok, prompt, [7], 24, eos=False, answer_room=3)
    three, _ = data.encode_pair(tok, prompt, [7, 8, 9], 24, eos=False, answer_room=3)
    assert one[:-1] == three[:-3] and len(three) == 24 and three[-3:] == [7, 8, 9]
    # with eos (encode_records' case) the eos is part of the answer
    ids, labels = data.encode_pair(tok, prompt, [7], 128)
    assert ids[-2:] == [7, tok.eos_token_id] and labels[-2:] == [7, tok.eos_token_id]


def test_collate_right_pads():
    batch = data.collate([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_sample_batches_are_seeded_shuffled_epochs():
    encoded = [([i], [i]) for i in range(10)]

    def draw(seed, num_batches=7):
        return data.sample_batches(encoded, 3, num_batches, torch.Generator().manual_seed(seed))

    batches = draw(0)
    assert batches == draw(0) and batches != draw(1)
    assert len(batches) == 7 and all(len(b) == 3 for b in batches)
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


@pytest.mark.parametrize(
    "examples, batch, epochs, expected", [(100, 10, 1.0, 10), (100, 10, 0.3, 3), (101, 10, 1.0, 11), (5, 8, 0.1, 1)]
)
def test_epochs_to_batches(examples, batch, epochs, expected):
    assert data.epochs_to_batches(examples, batch, epochs) == expected


# ------------------------------------------------------------------ JSON data


def test_dolly_client_files():
    if not DOLLY.is_dir():
        pytest.skip(f"{DOLLY} is absent")
    cfg = json_cfg(DOLLY)
    clients = data.client_records(cfg, 8, seed=0)
    assert [len(client) for client in clients] == DOLLY_SIZES
    assert set(clients[0][0]) == {"instruction", "context", "response", "category"}
    assert len(data.eval_records(cfg, seed=0)) == 80
    assert len(data.client_records(cfg, 3, seed=0)) == 3


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_single_file_partitions(tmp_path, partition):
    path = write_json(tmp_path / "all.json", make_records(103))
    cfg = json_cfg(path, partition=partition, dirichlet_alpha=0.3)
    clients = data.client_records(cfg, 5, seed=0)
    assert clients == data.client_records(cfg, 5, seed=0)
    assert clients != data.client_records(cfg, 5, seed=1)
    assert sum(map(len, clients)) == 103 and all(clients)
    instructions = sorted(r["instruction"] for client in clients for r in client)
    assert instructions == sorted(r["instruction"] for r in make_records(103))
    if partition == "iid":
        assert sorted(map(len, clients)) == [20, 20, 21, 21, 21]


def _key(record: dict) -> str:
    return record["instruction"]


def test_set_aside_per_client_is_disjoint_proportional_and_seeded(tmp_path):
    sizes = [10, 1, 7, 40]
    folder = tmp_path / "clients"
    folder.mkdir()
    for client, size in enumerate(sizes):
        records = [dict(r, instruction=f"client {client} {r['instruction']}") for r in make_records(size)]
        write_json(folder / f"local_training_{client}.json", records)
    cfg = json_cfg(folder)
    whole = data.client_records(cfg, 4, seed=0)
    clients, aside = data.split_records(cfg, 4, seed=0, set_aside=data.SetAside(0.25, seed=3))
    # floor(0.25 n) per client
    assert [len(c) for c in clients] == [8, 1, 6, 30]
    assert len(aside) == 2 + 0 + 1 + 10
    for kept, full in zip(clients, whole):
        assert [_key(r) for r in kept] == [_key(r) for r in full if r in kept]  # record order kept
    kept_keys = {_key(r) for c in clients for r in c}
    aside_keys = {_key(r) for r in aside}
    assert not kept_keys & aside_keys
    assert kept_keys | aside_keys == {_key(r) for c in whole for r in c}
    # the set-aside follows its own seed, not the run's
    assert data.split_records(cfg, 4, seed=9, set_aside=data.SetAside(0.25, seed=3)) == (clients, aside)
    assert data.split_records(cfg, 4, seed=0, set_aside=data.SetAside(0.25, seed=4))[1] != aside
    # even a share of 1 leaves every client one record
    everything = data.split_records(cfg, 4, seed=0, set_aside=data.SetAside(1.0, seed=3))
    assert [len(c) for c in everything[0]] == [1, 1, 1, 1] and len(everything[1]) == sum(sizes) - 4


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_set_aside_before_a_partition_does_not_follow_the_run_seed(tmp_path, partition):
    path = write_json(tmp_path / "all.json", make_records(103))
    cfg = json_cfg(path, partition=partition)
    set_aside = data.SetAside(0.2, seed=1)
    clients, aside = data.split_records(cfg, 5, seed=0, set_aside=set_aside)
    assert len(aside) == 20 and sum(map(len, clients)) == 83
    assert {_key(r) for c in clients for r in c}.isdisjoint({_key(r) for r in aside})
    other_clients, other_aside = data.split_records(cfg, 5, seed=7, set_aside=set_aside)
    assert other_aside == aside and other_clients != clients


def test_without_set_aside_nothing_is_set_aside():
    cfg = synthetic_cfg(examples_per_client=12)
    clients, aside = data.split_records(cfg, 3, seed=0)
    assert aside == [] and clients == data.client_records(cfg, 3, seed=0)
    clients, aside = data.split_records(cfg, 3, seed=0, set_aside=data.SetAside(0.5, seed=0))
    assert [len(c) for c in clients] == [6, 6, 6] and len(aside) == 18


def test_dirichlet_partition_is_non_iid_and_fills_empty_clients():
    categories = ["a"] * 50 + ["b"] * 50 + ["c"] * 50
    groups = data.dirichlet_partition(categories, 10, alpha=0.05, seed=0)
    assert all(groups) and sorted(i for g in groups for i in g) == list(range(150))
    histograms = {tuple(sorted(Counter(categories[i] for i in g).items())) for g in groups}
    assert len(histograms) > 1


def test_dirichlet_uses_the_category_field(tmp_path):
    records = [dict(r, topic=r["category"]) for r in make_records(60)]
    path = write_json(tmp_path / "all.json", records)
    clients = data.client_records(json_cfg(path, partition="dirichlet", category_field="topic"), 3, seed=0)
    assert {r["category"] for client in clients for r in client} == {"a", "b", "c"}


def test_json_lines_and_alpaca_aliases(tmp_path):
    lines = [
        {"instruction": "Say hi.", "input": "to Bob", "output": "Hi Bob", "class": "greeting"},
        {"instruction": "Count.", "output": "3"},
    ]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    assert data.load_json_records(path) == [
        {"instruction": "Say hi.", "context": "to Bob", "response": "Hi Bob", "category": "greeting"},
        {"instruction": "Count.", "context": "", "response": "3", "category": "none"},
    ]


def test_eval_records_from_eval_path_or_global_test(tmp_path):
    write_json(tmp_path / "local_training_0.json", make_records(4))
    write_json(tmp_path / "global_test.json", make_records(2))
    other = write_json(tmp_path / "other.json", make_records(3))
    assert len(data.eval_records(json_cfg(tmp_path), seed=0)) == 2
    assert len(data.eval_records(json_cfg(tmp_path, eval_path=str(other)), seed=0)) == 3


# ------------------------------------------------------------------ user-facing errors


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match=r"'.*nowhere\.json' not found"):
        data.client_records(json_cfg(tmp_path / "nowhere.json", partition="iid"), 2, seed=0)


def test_missing_client_directory(tmp_path):
    with pytest.raises(DataError, match=r"data\.path '.*absent' not found.*directory"):
        data.client_records(json_cfg(tmp_path / "absent"), 2, seed=0)


def test_first_missing_client_file_is_named(tmp_path):
    for client in range(2):
        write_json(tmp_path / f"local_training_{client}.json", make_records(3))
    with pytest.raises(DataError, match=r"local_training_2\.json' not found.*federation\.num_clients"):
        data.client_records(json_cfg(tmp_path), 4, seed=0)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"'.*empty\.json' is empty"):
        data.load_json_records(path)


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "response": "b"},\n  {"instruction": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"'.*bad\.json' is not valid JSON: .* at line 3, column 19"):
        data.load_json_records(path)


def test_malformed_json_lines_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"'.*bad\.jsonl' \(JSON Lines\) is not valid JSON at line 2"):
        data.load_json_records(path)


def test_top_level_must_be_a_list(tmp_path):
    path = tmp_path / "object.json"
    path.write_text(json.dumps({"data": make_records(2)}, indent=1), encoding="utf-8")
    with pytest.raises(DataError, match=r"'.*object\.json' holds a JSON object at the top level: it must be a list"):
        data.load_json_records(path)


def test_records_must_be_objects(tmp_path):
    path = write_json(tmp_path / "strings.json", ["not a record"])
    with pytest.raises(DataError, match=r"'.*strings\.json': record 0 is a JSON string, not an object"):
        data.load_json_records(path)


@pytest.mark.parametrize(
    "field, message",
    [("instruction", r"no 'instruction' field"), ("response", r"no 'response' field \(or its alias 'output'\)")],
)
def test_record_missing_a_required_field(tmp_path, field, message):
    records = make_records(3)
    del records[2][field]
    path = write_json(tmp_path / "missing.json", records)
    with pytest.raises(DataError, match=rf"'.*missing\.json': record 2 has {message}"):
        data.load_json_records(path)


def test_record_field_must_be_a_string(tmp_path):
    path = write_json(tmp_path / "typed.json", [{"instruction": "a", "output": 3}])
    with pytest.raises(DataError, match=r"record 0 field 'output' is a JSON number: make it a string"):
        data.load_json_records(path)


def test_client_file_with_no_examples(tmp_path):
    write_json(tmp_path / "local_training_0.json", make_records(3))
    write_json(tmp_path / "local_training_1.json", [])
    with pytest.raises(DataError, match=r"client 1 has no examples: '.*local_training_1\.json' is an empty list"):
        data.client_records(json_cfg(tmp_path), 2, seed=0)


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_partition_with_fewer_records_than_clients(tmp_path, partition):
    path = write_json(tmp_path / "small.json", make_records(3))
    with pytest.raises(DataError, match=r"client \d gets no examples: '.*small\.json' has 3 records for 4 clients"):
        data.client_records(json_cfg(path, partition=partition), 4, seed=0)


def test_missing_eval_file(tmp_path):
    write_json(tmp_path / "local_training_0.json", make_records(3))
    with pytest.raises(DataError, match=r"no held-out data .* set data\.eval_path .*global_test\.json"):
        data.eval_records(json_cfg(tmp_path), seed=0)


def test_plain_prompts_are_language_modelled_whole(synthetic_tokenizer):
    with_context = {"instruction": " Reverse the words. ", "context": "red blue", "response": "blue red"}
    bare = {"instruction": "Say hi.", "context": "", "response": "hi"}
    assert data.plain_prompt(with_context) == "Reverse the words.\nred blue"
    assert data.plain_prompt(bare) == "Say hi."  # no template, no response, no empty input line
    assert data.plain_prompt(with_context, with_context=False) == "Reverse the words."
    texts = [data.plain_prompt(with_context), data.plain_prompt(bare)]
    (ids, labels), (short_ids, _) = data.encode_texts(texts, synthetic_tokenizer, max_length=64)
    expected = [synthetic_tokenizer.bos_token_id, *synthetic_tokenizer.encode(texts[0], add_special_tokens=False)]
    assert ids == expected and labels == ids  # every token is scored
    assert synthetic_tokenizer.eos_token_id not in ids
    cut, _ = data.encode_texts(texts[:1], synthetic_tokenizer, max_length=3)[0]
    assert cut == expected[:3]
    assert short_ids[0] == synthetic_tokenizer.bos_token_id
    assert data.encode_texts([], synthetic_tokenizer, 8) == []


@pytest.mark.parametrize("fraction", [None, 0.25])
def test_client_data_makes_each_generated_client_as_the_whole_split_does(fraction):
    """A run reads clients through ClientData: generated on demand, yet record for record what
    split_records gives for every client, with or without a per-client set-aside."""
    cfg = synthetic_cfg(examples_per_client=9)
    set_aside = data.SetAside(fraction, seed=5) if fraction else None
    everyone = data.split_records(cfg, 40, seed=3, set_aside=set_aside)[0]
    lazy = data.ClientData(cfg, 40, seed=3, set_aside=set_aside)
    assert lazy.generated and len(lazy) == 40
    assert [lazy[k] for k in range(40)] == everyone
    assert lazy[5:9] == everyone[5:9] and lazy[-1] == everyone[-1]
    assert [lazy.num_records(k) for k in range(40)] == [len(records) for records in everyone]
    with pytest.raises(IndexError):
        lazy[40]


def test_client_data_of_many_registered_clients_costs_what_is_asked_for(monkeypatch):
    """100,000 registered clients: making the data object and one client generates one client."""
    from florist_mpi.data import split

    made = []
    original = data.synthetic_client_records
    monkeypatch.setattr(split, "synthetic_client_records", lambda cfg, client, seed: made.append(client) or
                        original(cfg, client, seed))
    lazy = data.ClientData(synthetic_cfg(examples_per_client=8), 100_000, seed=0)
    assert made == []
    assert len(lazy[99_999]) == 8 and lazy.num_records(12_345) == 8
    assert made == [99_999]


def test_client_data_from_files_reads_them_at_once(tmp_path):
    for client in range(3):
        (tmp_path / f"client_{client}.json").write_text(json.dumps(make_records(2 + client)))
    cfg = DataConfig(source="json", path=str(tmp_path), partition="files", client_pattern="client_{client}.json")
    files = data.ClientData(cfg, 3, seed=0)
    assert not files.generated
    assert [files.num_records(k) for k in range(3)] == [2, 3, 4]
    assert files[1] == data.split_records(cfg, 3, seed=0)[0][1]
