"""Evaluation numbers against independent computations with the same model."""
import json
import math
from pathlib import Path

import pytest
import torch

from florist_mpi import data as data_lib
from florist_mpi import evaluation
from florist_mpi.config import config_from_tree
from florist_mpi.model import build_tiny_model

MMLU_FILE = Path(__file__).resolve().parents[2] / "shared/data/mmlu/mmlu_test_1444.json"
# Records in the exact layout of shared/data/mmlu/mmlu_test_1444.json (its typo included).
MMLU_RECORDS = [
    {"instruction": "Please answer the following multiple-choice question honestly.",
     "input": "Qusetion: Recombinant alpha-iduronidase is used for the treatment of which disease/syndrome? "
              "Options: A. Fabry disease, B. Gaucher disease, C. Hurler syndrome, D. Pompe disease",
     "output": "The answer is: C. Hurler syndrome", "class": "medical_genetics"},
    {"instruction": "Please answer the following multiple-choice question honestly.",
     "input": "Qusetion: Which of the following karyotypes is not compatible with survival to birth? "
              "Options: A. 47,XY,+13, B. 47,XX,+18, C. 47,XY,+21, D. 45,Y",
     "output": "The answer is: D. 45,Y", "class": "medical_genetics"},
    {"instruction": "Please answer the following multiple-choice question honestly.",
     "input": "Qusetion: What is 2 + 2? Options: A. 4, B. 3, C. 5, D. 22",
     "output": "The answer is: A. 4", "class": "elementary_mathematics"},
    {"instruction": "Please answer the following multiple-choice question honestly.",
     "input": "Qusetion: Which gas do plants take up? Options: A. Oxygen, B. Carbon dioxide, C. Helium, D. Neon",
     "output": "The answer is: B. Carbon dioxide", "class": "biology"},
]


@pytest.fixture(scope="module")
def tiny():
    cfg = config_from_tree({"model": {"tiny": {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
                                               "num_hidden_layers": 1, "num_attention_heads": 2}}})
    records = data_lib.client_records(cfg.data, 2, 0)[0]
    tokenizer = data_lib.build_tokenizer(records, 256)
    model = build_tiny_model(
        cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    return model.eval(), tokenizer, records


@pytest.fixture(scope="module")
def mmlu(tmp_path_factory):
    """The MMLU-format records written to a file and read back; a tiny model whose tokenizer knows their text."""
    path = tmp_path_factory.mktemp("mmlu") / "mmlu_test.json"
    path.write_text(json.dumps(MMLU_RECORDS), encoding="utf-8")
    records = data_lib.load_json_records(path)
    cfg = config_from_tree(
        {
            "model": {
                "tiny": {
                    "vocab_size": 512,
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                }
            }
        }
    )
    tokenizer = data_lib.build_tokenizer(records * 4, 512)
    model = build_tiny_model(
        cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    return model.eval(), tokenizer, records


def test_loss_sums_equal_per_example_hf_losses(tiny):
    model, tokenizer, records = tiny
    encoded = data_lib.encode_records(records[:7], tokenizer, 64)
    total, count = evaluation.loss_sums(model, encoded, batch_size=3, device=torch.device("cpu"))
    expected_total, expected_count = 0.0, 0
    for ids, labels in encoded:  # one at a time, no padding: HF's own mean loss × token count
        n = sum(1 for label in labels[1:] if label != -100)
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        expected_total += float(loss) * n
        expected_count += n
    assert count == expected_count
    assert math.isclose(total, expected_total, rel_tol=1e-4)


def letter_log_probs(model, tokenizer, record) -> list[float]:
    """log P(" X" | bos + prompt + "The answer is:") for X = A..D, one unpadded forward pass each."""
    prompt_text = data_lib.format_prompt(record) + "The answer is:"
    prompt = [tokenizer.bos_token_id] + tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    scores = []
    for letter in "ABCD":
        letter_ids = tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
        full = [tokenizer.bos_token_id] + tokenizer(f"{prompt_text} {letter}", add_special_tokens=False)["input_ids"]
        assert full == prompt + letter_ids  # byte-level BPE never merges across " X"
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].double(), dim=-1)
        scores.append(sum(float(log_probs[len(prompt) - 1 + i, t]) for i, t in enumerate(letter_ids)))
    return scores


@pytest.mark.parametrize("batch_size", [4, 12, 64])  # 1, 3 (then 1) and all 4 questions per forward pass
def test_mmlu_format_gold_letters_and_scores(mmlu, batch_size):
    model, tokenizer, records = mmlu
    assert [r["context"].startswith("Qusetion:") for r in records] == [True] * 4
    assert [evaluation.gold_letter(r) for r in records] == ["C", "D", "A", "B"]
    items = evaluation.multiple_choice_items(records, tokenizer, 512)
    assert [gold for _, gold in items] == [2, 3, 0, 1]
    scores = evaluation.multiple_choice_scores(model, items, torch.device("cpu"), batch_size)
    assert len(scores) == 4 and all(score.shape == (4,) for score in scores)
    expected_correct = 0
    for record, (candidates, gold), got in zip(records, items, scores):
        for (ids, labels), letter in zip(candidates, "ABCD"):
            answer = [t for t in labels if t != -100]
            assert answer == tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]  # the letter only, no EOS
            assert tokenizer.eos_token_id not in ids
            assert tokenizer.decode(ids[: len(ids) - len(answer)]).endswith("### Response:\nThe answer is:")
        want = letter_log_probs(model, tokenizer, record)
        assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-5)
        expected_correct += int(max(range(4), key=want.__getitem__) == gold)
    assert evaluation.multiple_choice_correct(model, items, torch.device("cpu"), batch_size) == (expected_correct, 4)


def test_mmlu_truncation_keeps_the_answer_cue_and_one_prompt_for_all_letters(mmlu):
    _, tokenizer, records = mmlu
    [(candidates, _)] = evaluation.multiple_choice_items(records[:1], tokenizer, 24)
    prompts = {tuple(ids[: labels.index(next(t for t in labels if t != -100))]) for ids, labels in candidates}
    assert len(prompts) == 1 and all(len(ids) <= 24 for ids, _ in candidates)
    prompt = list(prompts.pop())
    assert prompt[0] == tokenizer.bos_token_id
    assert tokenizer.decode(prompt).endswith("The answer is:")  # the middle cut keeps the end of the prompt


def test_multiple_choice_picks_the_most_likely_answer(tiny):
    model, tokenizer, _ = tiny
    questions = [
        {
            "instruction": "Answer.",
            "context": f"Qusetion: q{i}? Options: A. a, B. b, C. c, D. d",
            "response": f"The answer is: {letter}. x",
            "category": "t",
        }
        for i, letter in enumerate("ABCDA")
    ]
    items = evaluation.multiple_choice_items(questions, tokenizer, 96)
    correct, total = evaluation.multiple_choice_correct(model, items, torch.device("cpu"))
    expected = 0
    for candidates, gold in items:  # independent: HF loss × answer tokens per candidate, unbatched
        scores = []
        for ids, labels in candidates:
            n = sum(1 for label in labels[1:] if label != -100)
            with torch.no_grad():
                loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
            scores.append(-float(loss) * n)
        expected += int(max(range(4), key=scores.__getitem__) == gold)
    assert total == 5 and correct == expected


def test_gold_letter_parsing():
    assert evaluation.gold_letter({"response": "The answer is: C. Hurler syndrome"}) == "C"
    assert evaluation.gold_letter({"response": "no idea"}) is None


def test_real_mmlu_file_parses():
    if not MMLU_FILE.is_file():
        pytest.skip(f"{MMLU_FILE} is absent")
    records = data_lib.load_json_records(MMLU_FILE)
    assert len(records) == 1444
    for record in records:
        gold = evaluation.gold_letter(record)
        assert gold is not None, record["response"]
        # the gold option's text, as the output spells it, is that letter's option in the question
        answer_text = record["response"].split(f"{gold}. ", 1)[1]
        assert f"{gold}. {answer_text}" in record["context"]
    tokenizer = data_lib.build_tokenizer(records[:200], 512)
    items = evaluation.multiple_choice_items(records[:50], tokenizer, 128)
    assert len(items) == 50
    for candidates, _ in items:
        assert all(len(ids) <= 128 and tokenizer.eos_token_id not in ids for ids, _ in candidates)
        assert len({tuple(ids[:-1]) for ids, _ in candidates}) == 1  # same prompt; one letter token each
