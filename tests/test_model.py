"""Base-model helpers: merging updates into low-precision weights, device and thread choice."""
import numpy as np
import pytest
import torch

from florist_mpi.model import float32_masters, merge_update


def test_merges_into_bfloat16_weights_go_through_float32_masters():
    g = torch.Generator().manual_seed(0)
    w0 = (torch.randn(64, 48, generator=g) * 0.02).to(torch.bfloat16).float()  # a bf16 checkpoint
    rounds = [(np.asarray(torch.randn(64, 2, generator=g) * 1e-2), np.asarray(torch.randn(2, 48, generator=g) * 1e-2))
              for _ in range(20)]
    exact = w0.double() + sum(torch.from_numpy(B).double() @ torch.from_numpy(A).double() for B, A in rounds)

    with_masters = {"m": torch.nn.Linear(48, 64, bias=False).to(torch.bfloat16)}
    naive = {"m": torch.nn.Linear(48, 64, bias=False).to(torch.bfloat16)}
    for modules in (with_masters, naive):
        with torch.no_grad():
            modules["m"].weight.copy_(w0)
    masters = float32_masters(with_masters)
    assert set(masters) == {"m"} and masters["m"].dtype == torch.float32
    for B, A in rounds:
        merge_update(with_masters, {"m": (B, A)}, masters)
        merge_update(naive, {"m": (B, A)})
    update = (exact - w0.double()).norm()
    # the master holds the exact sum (to float32), the weight is its bfloat16 rounding
    assert (masters["m"].double() - exact).norm() / update < 1e-5
    assert torch.equal(with_masters["m"].weight, masters["m"].to(torch.bfloat16))
    error_masters = (with_masters["m"].weight.double() - exact).norm() / update
    error_naive = (naive["m"].weight.double() - exact).norm() / update
    assert error_masters < error_naive / 2, (error_masters, error_naive)


def test_float32_weights_need_no_masters():
    assert float32_masters({"m": torch.nn.Linear(4, 3)}) == {}


# ------------------------------------------------------------------ the tiny base's warm-up data and cache key

DEMO = "configs/demo.yaml"


def _cfg(*overrides):
    from pathlib import Path

    from florist_mpi.config import load_config

    return load_config(Path(__file__).resolve().parents[1] / DEMO, list(overrides))


def test_held_out_warm_up_trains_on_what_the_clients_never_see():
    from collections import Counter

    from florist_mpi.warmup import training_split

    pooled_clients, pooled_warmup = training_split(_cfg("model.warmup_steps=10"))
    assert pooled_warmup == [r for c in pooled_clients for r in c]  # `clients`: the warm-up reuses their data
    clients, warmup = training_split(_cfg("model.warmup_steps=10", "model.warmup_data=held_out",
                                          "model.warmup_fraction=0.25"))
    assert [len(c) for c in clients] == [len(c) - len(c) // 4 for c in pooled_clients]
    assert len(warmup) == sum(len(c) // 4 for c in pooled_clients)
    # generated records can repeat, so compare multisets: kept + set aside = all, record for record
    def counts(records):
        return Counter(tuple(sorted(r.items())) for r in records)

    assert counts(r for c in clients for r in c) + counts(warmup) == counts(pooled_warmup)
    for kept, whole in zip(clients, pooled_clients):
        assert not counts(kept) - counts(whole)  # each client keeps a part of its own records
    # no warm-up steps, or a pretrained model (which has no warm-up): nothing is set aside
    assert training_split(_cfg("model.warmup_data=held_out"))[0] == pooled_clients
    assert training_split(_cfg("model.warmup_steps=10", "model.warmup_data=held_out",
                               "model.name=some/pretrained"))[0] == pooled_clients


def test_model_seed_keeps_one_cached_base_across_run_seeds(tmp_path):
    from florist_mpi.model import _tiny_cache_key

    json_data = ["data.source=json", f"data.path={tmp_path}"]  # key only: the files are not read
    held_out = ["model.warmup_steps=10", "model.warmup_data=held_out"]

    def key(*overrides):
        return _tiny_cache_key(_cfg(*overrides))

    # by default the base follows run.seed
    assert key("run.seed=1") != key("run.seed=2")
    # model.seed: one base for per-client files ...
    assert key("model.seed=0", "run.seed=1", *json_data) == key("model.seed=0", "run.seed=2", *json_data)
    assert key("model.seed=0", "run.seed=1", *json_data) != key("model.seed=1", "run.seed=1", *json_data)
    # ... and for a set-aside chosen before the partition, but not where the warm-up data follows run.seed
    partitioned = [*json_data, "data.partition=iid"]
    assert key("model.seed=0", "run.seed=1", *partitioned, *held_out) == key(
        "model.seed=0", "run.seed=2", *partitioned, *held_out)
    assert key("model.seed=0", "run.seed=1", *partitioned) != key("model.seed=0", "run.seed=2", *partitioned)
    assert key("model.seed=0", "run.seed=1") != key("model.seed=0", "run.seed=2")  # generated data
    # the warm-up's batch size (train.micro_batch_size) makes another base, without warm-up it does not matter
    assert key(*held_out, "train.micro_batch_size=4") != key(*held_out, "train.micro_batch_size=8")
    assert key("train.micro_batch_size=4") == key("train.micro_batch_size=8")
    # what the warm-up reads makes another base
    assert len({key(*held_out, f"model.warmup_text={text}") for text in ("examples", "prompts", "instructions")}) == 3
    assert key(*held_out, "model.warmup_fraction=0.2") != key(*held_out, "model.warmup_fraction=0.25")
    # the held-out warm-up is another base than the pooled one
    assert key(*json_data, "model.warmup_steps=10") != key(*json_data, *held_out)


def test_many_registered_clients_share_the_base_of_a_thousand(tmp_path):
    """Without a warm-up the tokenizer learns from at most warmup.TOKENIZER_CLIENTS clients of per-client
    data: 100,000 registered clients build (and cache) the base of 1,000; smaller federations keep theirs."""
    import hashlib
    import json

    from florist_mpi.model import _tiny_cache_key
    from florist_mpi.warmup import TOKENIZER_CLIENTS, base_data_clients, training_split

    def key(*overrides):
        return _tiny_cache_key(_cfg("lora.ranks=null", "lora.rank=4", *overrides))

    assert TOKENIZER_CLIENTS == 1000
    assert key("federation.num_clients=100000") == key("federation.num_clients=1000")
    assert key("federation.num_clients=8") != key("federation.num_clients=1000")
    # a warm-up pools every client's records: no cap
    warm = "model.warmup_steps=10"
    assert key(warm, "federation.num_clients=100000") != key(warm, "federation.num_clients=1000")
    # a single file to partition is read whole anyway: no cap
    assert base_data_clients(_cfg("data.source=json", f"data.path={tmp_path}", "data.partition=iid",
                                  "lora.ranks=null", "federation.num_clients=5000")) == 5000
    # the key of a federation below the cap is the one it always had (its cached base stays valid)
    cfg = _cfg("lora.ranks=null", "lora.rank=4", "federation.num_clients=8")
    spec = {"tiny": cfg.model.tiny.model_dump(), "seed": cfg.model.base_seed(cfg.run.seed), "warmup_steps": 0,
            "warmup_lr": cfg.model.warmup_lr, "data": cfg.data.model_dump(mode="json"), "num_clients": 8,
            "format": 1}
    assert key("federation.num_clients=8") == hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    # the capped tokenizer data are the first clients' records, whatever the federation's size
    small = training_split(_cfg("lora.ranks=null", "federation.clients_per_round=null", "federation.num_clients=3"))[1]
    assert training_split(_cfg("lora.ranks=null", "federation.num_clients=50"), 3)[1] == small


def test_warmup_sequences_model_the_chosen_text():
    from florist_mpi import data
    from florist_mpi.warmup import warmup_sequences

    records = [
        {"instruction": "Reverse the words.", "context": "red blue", "response": "blue red", "category": "a"},
        {"instruction": "Say hi.", "context": "", "response": "hi", "category": "a"},
        {"instruction": "  ", "context": "", "response": "nothing", "category": "a"},
    ]
    tokenizer = data.build_tokenizer(records * 20, 300)
    bos = [tokenizer.bos_token_id]

    def ids(text):
        return bos + tokenizer.encode(text, add_special_tokens=False)

    def sequences(text):
        return warmup_sequences(records, tokenizer, _cfg(f"model.warmup_text={text}"))

    # plain text, every token scored; an empty instruction leaves nothing to learn and is dropped
    assert sequences("instructions") == [(ids("Reverse the words."),) * 2, (ids("Say hi."),) * 2]
    assert sequences("prompts") == [(ids("Reverse the words.\nred blue"),) * 2, (ids("Say hi."),) * 2]
    # whole formatted examples: the template and the response are scored too
    whole = sequences("examples")
    assert len(whole) == 3 and all(labels == input_ids for input_ids, labels in whole)
    assert whole[0][0] == data.encode_records(records[:1], tokenizer, 128)[0][0]
    assert tokenizer.encode("blue red", add_special_tokens=False)[0] in whole[0][0]


def test_a_set_aside_that_takes_nothing_is_refused():
    from florist_mpi.errors import UserError
    from florist_mpi.warmup import training_split

    cfg = _cfg("model.warmup_steps=10", "model.warmup_data=held_out", "model.warmup_fraction=0.001")
    with pytest.raises(UserError, match="model.warmup_fraction 0.001 sets no record aside"):
        training_split(cfg)


def test_model_seed_must_not_be_negative():
    from florist_mpi.config import ConfigError

    with pytest.raises(ConfigError, match="seed"):
        _cfg("model.seed=-1")
