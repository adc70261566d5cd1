"""Client batching (train.client_batch): every client of a group gets what training it alone gives it.

The one-at-a-time path is the reference throughout (its reused engines are bitwise a fresh
PEFT wrapper and engine: tests/test_training.py). Tolerance: 1e-5 relative (the issue's), per
factor and per train loss; LoRA dropout masks must be bitwise the same.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, florist_cli, mpi_env, run_mpi

from florist_mpi.client_groups import GroupTrainer, form_groups, group_key, per_client_loss, stack_batches
from florist_mpi.config import ConfigError, config_from_tree
from florist_mpi.data import collate
from florist_mpi.errors import UserError
from florist_mpi.grouped_attention import per_client_attention
from florist_mpi.grouped_lora import DropoutStreams, GroupedLora, RowLayout
from florist_mpi.training import ClientJob, deepspeed_config

TOLERANCE = 1e-5


def relative(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| (0 when both are 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / scale) if scale else float(np.linalg.norm(a))


# ------------------------------------------------------------ grouped vs one at a time (DeepSpeed)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("groups") / "factors.npz"
    result = subprocess.run([sys.executable, str(REPO / "tests/scripts/client_groups.py"), str(out),
                             "florist", "ffa", "flexlora", "epochs", "sgd"],
                            capture_output=True, text=True, timeout=600, cwd=REPO, env=mpi_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out)


@pytest.mark.parametrize("variant", ["florist", "ffa", "flexlora", "epochs", "sgd"])
def test_every_client_in_a_group_gets_its_one_at_a_time_result(saved, variant):
    """Heterogeneous ranks in groups of up to 3, LoRA dropout 0.1, two rounds; florist: gradient
    accumulation, clipping, weight decay; ffa: frozen shared A; flexlora: carried-over start;
    epochs: clients of different sizes leave their group when done; sgd: SGD with weight decay."""
    sequential = [k for k in saved.files if k.startswith(f"{variant}/sequential/")]
    assert len(sequential) == 2 * 8 * (7 * 2 + 1)  # rounds x clients x (7 modules x B, A + loss)
    worst = max(relative(saved[k.replace("/sequential/", "/grouped/")], saved[k]) for k in sequential)
    assert worst <= TOLERANCE, worst
    # the clients really differ from one another (no slot copied into another)
    first = f"{variant}/grouped/0/{{}}/model.layers.0.self_attn.q_proj/B"
    assert relative(saved[first.format(0)], saved[first.format(3)]) > 0.1


@pytest.mark.parametrize("variant", ["florist", "ffa", "flexlora", "epochs", "sgd"])
def test_lora_dropout_masks_are_bitwise_the_one_at_a_time_masks(saved, variant):
    alone = sorted(k for k in saved.files if k.startswith(f"{variant}/mask/sequential/"))
    together = sorted(k for k in saved.files if k.startswith(f"{variant}/mask/grouped/"))
    assert len(alone) == len(together) > 0
    compared = 0
    for key in alone:
        a, g = saved[key], saved[key.replace("/sequential/", "/grouped/")]
        assert a.shape == g.shape, key  # drawn at the client's own width, not the group's
        known = a != 2  # an input of exactly 0 shows no mask
        assert np.array_equal(a[known], g[known]), key
        compared += int(known.sum())
    dropped = np.mean([saved[k].mean() for k in together])
    assert compared > 10_000 and 0.05 < dropped < 0.15  # p = 0.1


def test_clipping_was_active_and_per_client(saved):
    for variant in ("florist", "ffa", "flexlora", "epochs"):
        coefficients = saved[f"{variant}/coefficients"]
        assert coefficients.min() < 0.95 and coefficients.max() <= 1.0, variant
        assert len(np.unique(coefficients[coefficients < 1])) > 1  # one per client, not one for the group


def test_groups_follow_rank_and_size_and_clients_leave_when_done(saved):
    ranks = [4, 2, 4, 4, 2, 4, 4, 2]
    members, batches = saved["epochs/groups/members"].tolist(), saved["epochs/groups/batches"].tolist()
    groups, counts, current, current_counts = [], [], [], []
    for client, count in zip(members, batches):
        if client == -1:
            groups.append(current)
            counts.append(current_counts)
            current, current_counts = [], []
        else:
            current.append(client)
            current_counts.append(count)
    assert sorted(c for g in groups for c in g) == sorted(list(range(8)) * 2)  # every client once per round
    assert all(len(g) <= 3 and len({ranks[c] for c in g}) == 1 for g in groups)
    assert any(len(set(c)) > 1 for c in counts)  # a group whose clients have different amounts of work


# ------------------------------------------------------------ the grouped layer against PEFT's


def _peft_layer(base: torch.nn.Linear, A: torch.Tensor, B: torch.Tensor, alpha: float, dropout: float):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    config = LoraConfig(r=A.shape[0], lora_alpha=alpha, lora_dropout=dropout)
    layer = Linear(base, "default", config, r=A.shape[0], lora_alpha=alpha)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_grouped_layer_equals_peft_lora_per_client(dropout):
    """Three clients of different lengths in one padded batch, the middle one inactive: each active
    client's output rows and factor gradients are PEFT's for that client alone, with its masks."""
    torch.manual_seed(0)
    m, n, r, b, alpha = 12, 10, 3, 2, 6.0
    base = torch.nn.Sequential(torch.nn.Linear(n, m, bias=False)).requires_grad_(False)
    lora = GroupedLora({"0": (m, n)}, 3, r, alpha / r, dropout, torch.device("cpu"))
    with torch.no_grad():
        lora.A[0].normal_()
        lora.B[0].normal_()
    lengths, active, width = {0: 4, 2: 7}, [0, 2], 7
    states = {}
    for slot in active:
        torch.manual_seed(100 + slot)
        states[slot] = torch.get_rng_state()
        if lora.dropout is not None:
            lora.dropout.start(slot)
    x = torch.randn(len(active) * b, width, n, requires_grad=True)
    lora.set_rows(active, RowLayout(b, tuple(lengths[s] for s in active), (False, False)))
    with lora.attached(base):
        out = base(x)
    grad = torch.randn_like(out)
    for j, slot in enumerate(active):  # gradient only where the client's own positions are
        grad[j * b:(j + 1) * b, lengths[slot]:] = 0
    out.backward(grad)
    assert lora.A[0].grad[1].abs().max() == 0 and lora.B[0].grad[1].abs().max() == 0  # inactive slot
    for j, slot in enumerate(active):
        own = slice(j * b, (j + 1) * b)
        layer = _peft_layer(base[0], lora.A[0][slot].detach(), lora.B[0][slot].detach(), alpha, dropout)
        torch.set_rng_state(states[slot])
        xj = x.detach()[own, : lengths[slot]].clone().requires_grad_()
        expected = layer(xj)
        expected.backward(grad[own, : lengths[slot]])
        assert torch.allclose(out[own, : lengths[slot]], expected, rtol=1e-6, atol=1e-6)
        assert relative(lora.A[0].grad[slot].numpy(), layer.lora_A["default"].weight.grad.numpy()) <= 1e-6
        assert relative(lora.B[0].grad[slot].numpy(), layer.lora_B["default"].weight.grad.numpy()) <= 1e-6
        assert torch.allclose(x.grad[own, : lengths[slot]], xj.grad, rtol=1e-5, atol=1e-6)


def test_dropout_streams_continue_each_clients_generator_and_restore_the_global_one():
    p, shape = 0.25, (2, 5, 7)
    expected = {}
    for slot, seed in ((0, 11), (1, 12)):  # what the one-at-a-time path draws after seeding
        torch.manual_seed(seed)
        expected[slot] = [torch.nn.functional.dropout(torch.ones(shape), p) for _ in range(3)]
    streams = DropoutStreams(p, torch.device("cpu"))
    for slot, seed in ((0, 11), (1, 12)):
        torch.manual_seed(seed)
        streams.start(slot)
    torch.manual_seed(99)
    before = torch.get_rng_state()
    for i in range(3):  # interleaved: each slot continues its own stream
        for slot in (1, 0):
            assert torch.equal(streams.mask(slot, shape), expected[slot][i])
    assert torch.equal(torch.get_rng_state(), before)


def test_clip_per_client_uses_each_clients_own_norm():
    torch.manual_seed(0)
    lora = GroupedLora({"a": (6, 5), "b": (4, 6)}, 3, 2, 1.0, 0.0, torch.device("cpu"))
    for p in lora.parameters():
        p.grad = torch.randn_like(p)
    with torch.no_grad():
        for p in lora.parameters():
            p.grad[1] *= 1e-3  # client 1 is under the limit: left alone
    before = [p.grad.clone() for p in lora.parameters()]
    lora.set_rows([0, 1, 2], RowLayout(1, (1, 1, 1), (False, False, False)))
    coefficients = lora.clip_per_client_(1.0)
    for slot in range(3):
        norm = np.sqrt(sum(float((g[slot].double() ** 2).sum()) for g in before))
        expected = min(1.0, 1.0 / (norm + 1e-6))  # DeepSpeed's rule, for this client alone
        assert abs(float(coefficients[slot]) - expected) <= 1e-6 * expected
        for p, g in zip(lora.parameters(), before):
            assert torch.allclose(p.grad[slot], g[slot] * expected, rtol=1e-6, atol=0)
    assert float(coefficients[1]) == 1.0
    # scaling one client's gradients changes no other client's coefficient
    for p, g in zip(lora.parameters(), before):
        p.grad = g.clone()
        p.grad[2] *= 50
    again = lora.clip_per_client_(1.0)
    assert torch.equal(again[:2], coefficients[:2]) and again[2] < coefficients[2]


# ------------------------------------------------------------ the shared base: loss and padding


def _tiny(attention: str):
    from florist_mpi.model import build_tiny_model

    cfg = config_from_tree({"model": {"tiny": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                                               "num_hidden_layers": 2, "num_attention_heads": 2}}})
    model = build_tiny_model(cfg, 64, 0, 1, 2)
    model.config._attn_implementation = attention
    return model.train()


def _client_batches():
    """Three clients' micro-batches of 2 rows: own widths 6, 9 (no padding of its own) and 4."""
    g = torch.Generator().manual_seed(3)
    rows = [[5, 3], [9, 9], [4, 2]]
    batches = []
    for lengths in rows:
        examples = []
        for length in lengths:
            ids = torch.randint(3, 64, (length,), generator=g).tolist()
            examples.append((ids, [-100] * 2 + ids[2:]))
        batches.append(collate(examples, 0))
    return batches


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_group_padding_changes_no_clients_logits_or_loss(attention):
    """The group pads every client to width 9; each client's logits (its own positions) and loss equal
    its forward alone (sdpa: split by client; eager: its sums do not depend on the padded length)."""
    model = _tiny(attention)
    batches = _client_batches()
    batch = stack_batches(batches, 0)
    layout = RowLayout(2, tuple(b["input_ids"].shape[1] for b in batches),
                       tuple(not bool(b["attention_mask"].all()) for b in batches))
    assert batch["input_ids"].shape == (6, 9) and layout.padded == (True, False, True)
    with torch.no_grad(), per_client_attention(model, layout):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        losses = per_client_loss(model, logits, [b["labels"] for b in batches])
    with torch.no_grad():
        for j, own in enumerate(batches):
            alone = model(**own, use_cache=False)
            width = own["input_ids"].shape[1]
            assert torch.allclose(logits[2 * j:2 * j + 2, :width], alone.logits, rtol=1e-6, atol=1e-6)
            assert abs(float(losses[j]) - float(alone.loss)) <= 1e-6 * float(alone.loss)


def test_attention_split_is_undone_after_the_block():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = _tiny("sdpa")
    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with per_client_attention(model, RowLayout(1, (3,), (False,))):
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not before
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before


def test_a_base_with_its_own_dropout_is_refused():
    model = _tiny("sdpa")
    model.config.attention_dropout = 0.1
    cfg = config_from_tree({"train": {"client_batch": 4}})
    with pytest.raises(UserError, match="dropout of its own"):
        GroupTrainer(model, {"model.layers.0.self_attn.q_proj": (32, 32)}, cfg, torch.device("cpu"), 4)


# ------------------------------------------------------------ groups and configuration


def _job(client: int, rank: int, alpha: float = 16.0, carried=None, frozen=None) -> ClientJob:
    return ClientJob(client, 0, rank, alpha, [], carried, frozen)


def test_groups_share_rank_alpha_and_start_and_hold_at_most_G():
    jobs = [_job(c, r, a) for c, (r, a) in enumerate([(8, 16), (4, 8), (8, 16), (8, 32), (8, 16), (4, 8), (8, 16)])]
    batches = {0: 3, 1: 3, 2: 5, 3: 3, 4: 3, 5: 3, 6: 5}
    groups = form_groups(jobs, batches, 2)
    assert [[j.client_id for j in g] for g in groups] == [[2, 6], [0, 4], [1, 5], [3]]  # most work first
    assert group_key(_job(0, 8, carried={})) != group_key(_job(1, 8)) != group_key(_job(2, 8, frozen={}))
    assert sum(len(g) for g in form_groups(jobs, batches, 64)) == 7


@pytest.mark.parametrize("train, words", [
    ({"client_batch": 0}, "at least 1"),
    ({"client_batch": -3}, "at least 1"),
    ({"client_batch": 4, "zero_stage": 1}, "zero_stage 0"),
    ({"client_batch": 4, "zero_stage": 2}, "zero_stage 0"),
    ({"client_batch": 4, "precision": "bf16"}, "precision fp32"),
    ({"client_batch": 4, "precision": "fp16"}, "precision fp32"),
    ({"client_batch": 4, "client_engines": "fresh"}, "client_engines"),
])
def test_configurations_that_cannot_be_batched_are_refused_in_one_line(train, words):
    with pytest.raises(ConfigError, match=words) as err:
        config_from_tree({"train": train})
    assert "\n" not in str(err.value) and "client_batch" in str(err.value)
    if train["client_batch"] > 1:  # the same settings one client at a time are fine
        assert config_from_tree({"train": {**train, "client_batch": 1}}).train.client_batch == 1


def test_validate_refuses_client_batch_with_zero_in_one_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  client_batch: 8\n  zero_stage: 2\n")
    result = subprocess.run([*florist_cli(), "validate", str(config), "--no-data"], capture_output=True, text=True,
                            cwd=REPO, env=mpi_env(), timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.client_batch 8 needs train.zero_stage 0" in lines[0]


def test_null_gradient_clipping_turns_deepspeeds_default_clipping_off():
    cpu = torch.device("cpu")
    assert deepspeed_config(config_from_tree({"train": {"gradient_clipping": None}}).train, cpu)[
        "gradient_clipping"] == 0.0  # DeepSpeed would clip at 1.0 without the key
    assert deepspeed_config(config_from_tree({"train": {"gradient_clipping": 0.3}}).train, cpu)[
        "gradient_clipping"] == 0.3


# ------------------------------------------------------------ acceptance: real runs


ACCEPTANCE = ["federation.num_clients=12", "federation.clients_per_round=12", "run.rounds=2", "train.local_steps=3",
              "lora.ranks=[8,8,8,8,8,8,8,8,4,4,4,4]", "lora.dropout=0.1", "eval.every=0", "log.client_adapters=true"]


@pytest.fixture(scope="module")
def acceptance_runs(tmp_path_factory):
    """The demo model, 12 clients x 3 local steps x 2 rounds, logged client adapters, by (method, G, ranks)."""
    tmp = tmp_path_factory.mktemp("acceptance")
    logs = {}

    def log(method: str, client_batch: int, ranks: int) -> str:
        key = (method, client_batch, ranks)
        if key not in logs:
            output = tmp / f"{method}_g{client_batch}_r{ranks}.h5"
            settings = [*ACCEPTANCE, f"federation.method={method}", f"train.client_batch={client_batch}",
                        f"run.output={output}"]
            args = [*florist_cli(), "run", "configs/demo.yaml", *[x for s in settings for x in ("--set", s)]]
            result = run_mpi(ranks, args, timeout=900)
            assert result.returncode == 0, result.stderr[-3000:]
            logs[key] = str(output)
        return logs[key]

    return log


def _compare_clients(a_path: str, b_path: str) -> tuple[float, float, int]:
    """Worst relative difference of any logged client factor, and of any client's train loss."""
    from florist_mpi.analysis import open_run

    a, b = open_run(a_path), open_run(b_path)
    worst_factor = worst_loss = 0.0
    count = 0
    for r in a.round_indices:
        ours, theirs = a.client_adapters(r), b.client_adapters(r)
        assert ours.keys() == theirs.keys() and len(ours) == 12
        for client in ours:
            for name, pair in ours[client].items():
                for mine, other in zip(pair, theirs[client][name]):
                    worst_factor = max(worst_factor, relative(mine, other))
                    count += 1
        loss_a, loss_b = (dict(zip(run.clients(r)["id"], run.clients(r)["train_loss"])) for run in (a, b))
        worst_loss = max(worst_loss, max(abs(loss_a[c] - loss_b[c]) / abs(loss_b[c]) for c in loss_b))
    return worst_factor, worst_loss, count


@pytest.mark.mpi
@pytest.mark.parametrize("method", ["florist", "ffa"])
def test_logged_client_adapters_at_G8_equal_G1(acceptance_runs, method):
    worst_factor, worst_loss, count = _compare_clients(acceptance_runs(method, 8, 1), acceptance_runs(method, 1, 1))
    assert count >= 2 * 12 * 15 and worst_factor <= TOLERANCE and worst_loss <= TOLERANCE, (worst_factor, worst_loss)


@pytest.mark.mpi
def test_batched_results_do_not_depend_on_the_number_of_ranks(acceptance_runs):
    worst_factor, worst_loss, _ = _compare_clients(acceptance_runs("florist", 8, 3), acceptance_runs("florist", 1, 1))
    assert worst_factor <= TOLERANCE and worst_loss <= TOLERANCE, (worst_factor, worst_loss)


@pytest.mark.mpi
def test_a_failing_client_leaves_its_group_and_the_round_goes_on(tmp_path):
    """Injected faults in a group of 4: the failed and the NaN client are left out; the others, in the
    same group, aggregate as usual."""
    from florist_mpi.analysis import open_run
    from florist_mpi.exchange import REASON_FAILED, REASON_NONFINITE

    output = tmp_path / "faults.h5"
    settings = ["federation.num_clients=6", "federation.clients_per_round=6", "run.rounds=1", "train.local_steps=2",
                "lora.ranks=null", "lora.rank=4", "eval.every=0", "train.client_batch=4", f"run.output={output}"]
    env = dict(mpi_env(), FLORIST_MPI_FAULT="raise@0:1,nan@0:2")
    result = run_mpi(1, [*florist_cli(), "run", "configs/demo.yaml", *[x for s in settings for x in ("--set", s)]],
                     env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "client 1 failed in round 0" in result.stderr
    clients = open_run(str(output)).clients(0)
    reasons = dict(zip(clients["id"], clients["excluded_reason"]))
    assert reasons[1] == REASON_FAILED and reasons[2] == REASON_NONFINITE
    assert [c for c, why in reasons.items() if not why] == [0, 3, 4, 5]
    assert np.isfinite(clients["train_loss"][clients["id"] != 1]).all()


@pytest.mark.mpi
@pytest.mark.parametrize("method", ["fedit", "flora", "flexlora"])
def test_other_methods_runs_at_G4_equal_G1(tmp_path, method):
    """The remaining methods end to end (FlexLoRA's clients start round 1 from their truncation of the
    global update): 6 clients of two ranks, 2 local steps, 2 rounds, LoRA dropout 0.1."""
    from florist_mpi.analysis import open_run

    logs = {}
    for client_batch in (1, 4):
        output = tmp_path / f"g{client_batch}.h5"
        settings = ["federation.num_clients=6", "federation.clients_per_round=6", "run.rounds=2", "train.local_steps=2",
                    "lora.ranks=[8,8,4,4,8,4]", "lora.dropout=0.1", "eval.every=0", f"federation.method={method}",
                    f"train.client_batch={client_batch}", f"run.output={output}"]
        result = run_mpi(1, [*florist_cli(), "run", "configs/demo.yaml", *[x for s in settings for x in ("--set", s)]],
                         timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        logs[client_batch] = open_run(str(output))
    worst = 0.0
    for r in (0, 1):
        ones, fours = logs[1].client_adapters(r), logs[4].client_adapters(r)
        assert ones.keys() == fours.keys() and len(ones) == 6
        for client, modules in ones.items():
            for name, pair in modules.items():
                worst = max(worst, *(relative(a, b) for a, b in zip(fours[client][name], pair)))
    assert worst <= TOLERANCE, worst
