"""Train fresh clients at ZeRO stage 0 and 1 and count what of their engines is still alive afterwards.

Prints `ALIVE <stage> <engines> <optimizers> <LoRA weights>`: objects of the trained clients that
something still references after train_client returned (tests/test_devices.py expects zeros).
A ZeRO-1 optimizer that is not destroyed stays reachable through the hooks it put on the LoRA
weights' gradient accumulators.
"""
import gc
import weakref

import numpy as np
import torch

from florist_mpi import training
from florist_mpi.config import config_from_tree
from florist_mpi.model import adapted_modules, build_tiny_model
from florist_mpi.training import ClientJob, isolate_torch_distributed, prepare_deepspeed, train_client

isolate_torch_distributed(0)
prepare_deepspeed()
device = torch.device("cpu")
engines, optimizers, lora_weights = [], [], []
original_engine = training.build_engine


def recording_engine(model, optimizer, train, device):
    engine = original_engine(model, optimizer, train, device)
    engines.append(weakref.ref(engine))
    optimizers.append(weakref.ref(engine.optimizer))
    lora_weights.extend(weakref.ref(p) for group in optimizer.param_groups for p in group["params"])
    return engine


training.build_engine = recording_engine
g = np.random.default_rng(0)
data = [(ids, ids) for ids in (g.integers(3, 96, size=12).tolist() for _ in range(8))]
for stage in (0, 1):
    cfg = config_from_tree({
        "federation": {"num_clients": 3},
        "model": {"tiny": {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                           "num_attention_heads": 2}},
        "lora": {"rank": 4, "target_modules": ["q_proj", "v_proj"]},
        "train": {"local_steps": 2, "micro_batch_size": 2, "zero_stage": stage, "client_engines": "fresh"},
    })
    model = build_tiny_model(cfg, 96, 0, 1, 2)
    shapes = {name: tuple(m.weight.shape) for name, m in adapted_modules(model, cfg.lora.target_modules).items()}
    engines.clear(), optimizers.clear(), lora_weights.clear()
    for client in range(3):
        job = ClientJob(client_id=client, round_index=0, rank=4, alpha=8.0, encoded=data)
        train_client(model, set(shapes), job, cfg, device)
    gc.collect()
    alive = [sum(ref() is not None for ref in refs) for refs in (engines, optimizers, lora_weights)]
    print(f"ALIVE zero{stage} {alive[0]} {alive[1]} {alive[2]}", flush=True)
