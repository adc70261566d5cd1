"""Evaluation numbers against independent computations with the same model."""
import math

import pytest
import torch

from florist_mpi import data as data_lib
from florist_mpi import evaluation
from florist_mpi.config import config_from_tree
from florist_mpi.model import build_tiny_model


@pytest.fixture(scope="module")
def tiny():
    cfg = config_from_tree({"model": {"tiny": {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
                                               "num_hidden_layers": 1, "num_attention_heads": 2}}})
    records = data_lib.client_records(cfg.data, 2, 0)[0]
    tokenizer = data_lib.build_tokenizer(records, 256)
    model = build_tiny_model(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
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


def test_multiple_choice_picks_the_most_likely_answer(tiny):
    model, tokenizer, _ = tiny
    questions = [{"instruction": "Answer.", "context": f"Qusetion: q{i}? Options: A. a, B. b, C. c, D. d",
                  "response": f"The answer is: {letter}. x", "category": "t"} for i, letter in enumerate("ABCDA")]
    items = evaluation.multiple_choice_items(questions, tokenizer, 96)
    correct, total = evaluation.multiple_choice_correct(model, items, torch.device("cpu"))
    expected = 0
    for (candidates, gold) in items:  # independent: HF loss × answer tokens per candidate, unbatched
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
