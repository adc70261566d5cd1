"""Train the same client jobs one at a time (ClientTrainer) and in groups (GroupTrainer); save both.

Run as `python client_groups.py OUT.npz VARIANT...` (a process of its own: DeepSpeed and a
torch.distributed world of one are set up here). tests/test_client_batch.py compares the two.

Variants (each on its own pair of bitwise-equal tiny bases, heterogeneous LoRA ranks, LoRA
dropout, groups of 3, two rounds, LoRA on attention, MLP and lm_head):
  florist   gradient accumulation 2, clipping at 0.5 (active), AdamW with weight decay
  ffa       FFA-LoRA's frozen shared A
  flexlora  FlexLoRA's carried-over start
  epochs    local_epochs 1 over clients of 3-7 micro-batches: clients leave their group when done
  sgd       SGD with weight decay, no clipping

Besides factors and losses it records every LoRA dropout mask both paths draw (which entries are
dropped), each group's members and micro-batch counts, and the per-client clip coefficients.
"""
import sys

import numpy as np
import torch
import torch.nn.functional as F

from florist_mpi import client_groups, grouped_lora
from florist_mpi.client_groups import GroupTrainer
from florist_mpi.config import config_from_tree
from florist_mpi.model import adapted_modules, build_tiny_model
from florist_mpi.training import ClientJob, ClientTrainer, isolate_torch_distributed, prepare_deepspeed

out, variants = sys.argv[1], sys.argv[2:]
isolate_torch_distributed(0)
prepare_deepspeed()
device = torch.device("cpu")
RANKS = [4, 2, 4, 4, 2, 4, 4, 2]
TRAIN = {
    "florist": {"local_steps": 3, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5, "weight_decay": 0.01},
    "ffa": {"local_steps": 3, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5},
    "flexlora": {"local_steps": 3, "gradient_clipping": 0.5},
    "epochs": {"local_steps": None, "local_epochs": 1.0, "gradient_clipping": 0.5},
    "sgd": {"local_steps": 4, "optimizer": "sgd", "weight_decay": 0.01, "gradient_clipping": None, "lr": 0.1},
}

# --------------------------------------------------------------- recording


class Recorder:
    """Dropout masks per client in draw order, groups, clip coefficients."""

    def __init__(self):
        self.client = None  # the client the one-at-a-time path is training
        self.sequential: dict[int, list[np.ndarray]] = {}
        self.grouped: dict[int, list[np.ndarray]] = {}
        self.group_clients: dict[int, int] = {}  # slot -> client of the group being trained
        self.groups: list[tuple[list[int], list[int]]] = []  # (clients, micro-batches of each)
        self.coefficients: list[float] = []


rec = Recorder()
dropout = F.dropout


def recording_dropout(x, p=0.5, training=True, inplace=False):
    y = dropout(x, p, training, inplace)
    if rec.client is not None and training and p > 0:  # the sequential path's LoRA dropout
        # 1 dropped, 0 kept, 2 unknown (an input of exactly 0 stays 0 either way)
        code = (y == 0).to(torch.int8) + 2 * (x == 0).to(torch.int8)
        rec.sequential.setdefault(rec.client, []).append(code.clamp(max=2).numpy().copy())
    return y


F.dropout = recording_dropout  # nn.Dropout calls F.dropout
mask = grouped_lora.DropoutStreams.mask


def recording_mask(self, slot, shape):
    noise = mask(self, slot, shape)
    rec.grouped.setdefault(rec.group_clients[slot], []).append((noise == 0).to(torch.int8).numpy().copy())
    return noise


grouped_lora.DropoutStreams.mask = recording_mask
start = GroupTrainer._start


def recording_start(self, lora, group):
    rec.group_clients = {j: job.client_id for j, job in enumerate(group)}
    return start(self, lora, group)


GroupTrainer._start = recording_start
train_group = GroupTrainer._train_group


def recording_train_group(self, group, plans):
    rec.groups.append(([job.client_id for job in group], [len(plans[job.client_id]) for job in group]))
    return train_group(self, group, plans)


GroupTrainer._train_group = recording_train_group
clip = grouped_lora.GroupedLora.clip_per_client_


def recording_clip(self, max_norm):
    coefficients = clip(self, max_norm)
    rec.coefficients.extend(coefficients.tolist())
    return coefficients


grouped_lora.GroupedLora.clip_per_client_ = recording_clip

# --------------------------------------------------------------- the runs

results = {}
for variant in variants:
    cfg = config_from_tree({
        "run": {"seed": 5},
        "federation": {"num_clients": 8, "method": {"ffa": "ffa", "flexlora": "flexlora"}.get(variant, "florist")},
        "model": {"tiny": {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                           "num_attention_heads": 2}},
        "lora": {"ranks": RANKS, "alpha": "2r", "dropout": 0.1,  # 7 modules: 2 layers x 3 and lm_head
                 "target_modules": ["q_proj", "v_proj", "down_proj", "lm_head"]},
        "train": {"micro_batch_size": 2, "lr": 0.01, "client_batch": 3, **TRAIN[variant]},
    })
    models = [build_tiny_model(cfg, 96, 0, 1, 2) for _ in range(2)]  # two bitwise-equal bases
    shapes = {name: tuple(m.weight.shape) for name, m in adapted_modules(models[0], cfg.lora.target_modules).items()}
    g = np.random.default_rng(1)
    # examples of 5-19 tokens (micro-batches of different widths); 6-14 examples per client
    data = {c: [(ids, ids) for ids in (g.integers(3, 96, size=int(g.integers(5, 20))).tolist()
                                      for _ in range(int(g.integers(6, 15))))] for c in range(8)}
    frozen = {name: g.standard_normal((4, n)).astype(np.float32) * 0.1 for name, (_, n) in shapes.items()} \
        if variant == "ffa" else None
    carried = {name: (g.standard_normal((m, 3)).astype(np.float32) * 0.01, g.standard_normal((3, n)).astype(np.float32))
               for name, (m, n) in shapes.items()} if variant == "flexlora" else None
    sequential = ClientTrainer(models[0], shapes, cfg, device)
    grouped = GroupTrainer(models[1], shapes, cfg, device, cfg.train.client_batch)
    rec.sequential, rec.grouped = {}, {}
    for round_index in (0, 1):
        jobs = [ClientJob(c, round_index, RANKS[c], cfg.lora.alpha_of(c), data[c], carried, frozen) for c in range(8)]
        together = grouped.train(jobs)
        for job in jobs:
            rec.client = job.client_id
            alone = sequential.train(job)
            rec.client = None
            for path, update in (("sequential", alone), ("grouped", together[job.client_id])):
                key = f"{variant}/{path}/{round_index}/{job.client_id}"
                results[f"{key}/loss"] = np.array(update.train_loss)
                for name in shapes:
                    results[f"{key}/{name}/B"], results[f"{key}/{name}/A"] = update.factors[name]
        for client in range(8):  # this round's masks, in draw order
            for path, masks in (("sequential", rec.sequential), ("grouped", rec.grouped)):
                for i, dropped in enumerate(masks.pop(client, [])):
                    results[f"{variant}/mask/{path}/{round_index}/{client}/{i:04d}"] = dropped
    results[f"{variant}/groups/members"] = np.array([c for members, _ in rec.groups for c in members + [-1]])
    results[f"{variant}/groups/batches"] = np.array([b for _, batches in rec.groups for b in batches + [-1]])
    results[f"{variant}/coefficients"] = np.array(rec.coefficients)
    rec.groups, rec.coefficients = [], []
np.savez(out, **results)
print(f"saved {len(results)} arrays for {variants} ({client_groups.__name__})")
