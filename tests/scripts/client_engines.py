"""Train the same client jobs through reused engines and through fresh ones; save both.

Run as `python client_engines.py OUT.npz [ffa|flexlora|plain|bf16base] [DEVICE]` (a process of its own:
DeepSpeed and a torch.distributed world of one are set up here). tests/test_training.py
compares the two. `bf16base`: a bfloat16 base model trained at fp32 precision (the reused path
on a GPU with `model.dtype: bfloat16`, `train.precision: fp32`), where PEFT rounds a new adapter's
A through the base's dtype.
"""
import sys
import time

import numpy as np
import torch

from florist_mpi.config import config_from_tree
from florist_mpi.model import adapted_modules, build_tiny_model
from florist_mpi.training import ClientJob, ClientTrainer, isolate_torch_distributed, prepare_deepspeed, train_client

out, variant = sys.argv[1], sys.argv[2]
device = torch.device(sys.argv[3] if len(sys.argv) > 3 else "cpu")  # benchmarks/gpu_check.py runs it on cuda
cfg = config_from_tree({
    "run": {"seed": 5},
    "federation": {"num_clients": 4, "method": {"ffa": "ffa", "flexlora": "flexlora"}.get(variant, "florist")},
    "model": {"tiny": {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                       "num_attention_heads": 2}},
    "lora": {"ranks": [4, 2, 4, 2], "alpha": "2r", "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "train": {"local_steps": 3, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "lr": 0.01},
})
if device.type == "cuda":
    torch.cuda.set_device(device)
isolate_torch_distributed(0, device)
prepare_deepspeed()
models = [build_tiny_model(cfg, 96, 0, 1, 2).to(device) for _ in range(2)]  # two bitwise-equal bases
if variant == "bf16base":
    models = [model.to(torch.bfloat16) for model in models]
modules = adapted_modules(models[0], cfg.lora.target_modules)
shapes = {name: tuple(m.weight.shape) for name, m in modules.items()}

g = np.random.default_rng(0)
data = {c: [(ids, ids) for ids in (g.integers(3, 96, size=int(g.integers(5, 20))).tolist() for _ in range(9))]
        for c in range(4)}
frozen = {name: g.standard_normal((4, n)).astype(np.float32) * 0.1 for name, (_, n) in shapes.items()} \
    if variant == "ffa" else None
carried = {name: (g.standard_normal((m, 3)).astype(np.float32) * 0.01, g.standard_normal((3, n)).astype(np.float32))
           for name, (m, n) in shapes.items()} if variant == "flexlora" else None
# Client 0 twice (round 0 and round 1), with other clients of the same and of another rank between.
order = [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (2, 1)]


def job(client, round_index):
    return ClientJob(client_id=client, round_index=round_index, rank=cfg.lora.rank_of(client),
                     alpha=cfg.lora.alpha_of(client), encoded=data[client], init_factors=carried, frozen_A=frozen)


reused = ClientTrainer(models[0], shapes, cfg, device)
assert reused.reuse
probe = torch.tensor([[1, 5, 9, 17, 33, 65]], device=device)
with torch.no_grad():
    before = models[0](input_ids=probe).logits
results = {}
seconds = {"reused": 0.0, "fresh": 0.0}
for client, round_index in order:
    start = time.perf_counter()
    a = reused.train(job(client, round_index))
    middle = time.perf_counter()
    b = train_client(models[1], set(shapes), job(client, round_index), cfg, device)
    seconds["reused"] += middle - start
    seconds["fresh"] += time.perf_counter() - middle
    for name in shapes:
        for k, tensor in enumerate(("B", "A")):
            results[f"reused/{client}/{round_index}/{name}/{tensor}"] = a.factors[name][k]
            results[f"fresh/{client}/{round_index}/{name}/{tensor}"] = b.factors[name][k]
    results[f"reused/{client}/{round_index}/loss"] = np.array(a.train_loss)
    results[f"fresh/{client}/{round_index}/loss"] = np.array(b.train_loss)
models[0].eval()
with torch.no_grad():
    after = models[0](input_ids=probe).logits
results["logits/before"], results["logits/after"] = before.float().cpu().numpy(), after.float().cpu().numpy()
results["weights/reused"] = np.concatenate([m.weight.detach().float().cpu().numpy().ravel() for m in modules.values()])
results["weights/fresh"] = np.concatenate([m.weight.detach().float().cpu().numpy().ravel()
                                           for m in adapted_modules(models[1], cfg.lora.target_modules).values()])
results["seconds/reused"], results["seconds/fresh"] = np.array(seconds["reused"]), np.array(seconds["fresh"])
np.savez(out, **results)
