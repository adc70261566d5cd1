"""Local training of one client: a fresh PEFT LoRA in its own DeepSpeed engine.

Clients never share state through DeepSpeed: each process joins a private
torch.distributed world of size one before DeepSpeed starts, so DeepSpeed has
no peer to all-reduce gradients with. Federated exchange happens over MPI only.
"""
from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from florist_mpi import data as data_lib
from florist_mpi.config import ExperimentConfig
from florist_mpi.exchange import ClientUpdate
from florist_mpi.faults import FAULT_ENV, client_fault
from florist_mpi.model import file_lock
from florist_mpi.seeding import derive_seed, Stream



class ClientTrainingError(RuntimeError):
    """A recoverable failure of one client's local training (the round goes on without it)."""


# ------------------------------------------------------------ process-level set-up


def isolate_torch_distributed(local_rank: int) -> None:
    """A private single-process torch.distributed world for this rank's DeepSpeed engines."""
    import torch.distributed as dist

    # DeepSpeed reads these. RANK/WORLD_SIZE describe the private world; LOCAL_RANK must
    # equal Open MPI's own number when there is one (DeepSpeed asserts it). The GPU is
    # chosen separately (select_device) and handed to DeepSpeed as its device_rank.
    local = os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", str(local_rank))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=local)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def _quiet_deepspeed() -> None:
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def prepare_deepspeed(verbose: bool = False) -> None:
    """Import DeepSpeed and build its JIT ops one process at a time.

    Several ranks compiling the same torch extension at once can deadlock on
    torch's own lock file, and a build killed midway leaves that file behind.
    An flock (released by the OS when its holder dies) serialises the builds;
    whoever holds it may safely clear a stale torch lock.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    # DeepSpeed prints build chatter on stdout; only rank 0's own progress belongs there.
    with contextlib.redirect_stdout(io.StringIO()) if not verbose else contextlib.nullcontext():
        import deepspeed  # noqa: F401
        from deepspeed.accelerator import get_accelerator

        _quiet_deepspeed()
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None:
            return
        extensions = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
        with file_lock(extensions / "florist_mpi_build.lock"):
            for stale in extensions.glob(f"*/{builder.NAME}/lock"):
                stale.unlink(missing_ok=True)
            import deepspeed.ops

            if deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
                builder.load(verbose=False)


def deepspeed_config(cfg: ExperimentConfig, device: torch.device) -> dict:
    train = cfg.train
    on_gpu = device.type == "cuda"
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "zero_optimization": {"stage": train.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # fp32 on CPU: reduced precision there is slow and unsupported by some kernels.
        "bf16": {"enabled": on_gpu and train.precision == "bf16"},
        "fp16": {"enabled": on_gpu and train.precision == "fp16"},
    }
    if train.gradient_clipping:
        config["gradient_clipping"] = train.gradient_clipping
    return config


# ----------------------------------------------------------------------- one client


@dataclass
class ClientJob:
    """What a rank needs to train one client this round."""

    client_id: int
    round_index: int
    rank: int
    alpha: float
    encoded: list
    # FlexLoRA: the client's LoRA starts from its truncation of last round's global update.
    init_factors: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    # FFA-LoRA: the frozen shared A (rows beyond this client's rank ignored).
    frozen_A: dict[str, np.ndarray] | None = None


def num_local_batches(cfg: ExperimentConfig, num_examples: int) -> int:
    """Micro-batches of one client's local work: always whole optimizer steps."""
    train = cfg.train
    accumulation = train.gradient_accumulation_steps
    if train.local_epochs is not None:
        micro_batches = data_lib.epochs_to_batches(num_examples, train.micro_batch_size, train.local_epochs)
        return -(-micro_batches // accumulation) * accumulation  # a partial last step would never be applied
    return train.local_steps * accumulation


def _lora_config(job: ClientJob, cfg: ExperimentConfig):
    import peft

    return peft.LoraConfig(
        r=job.rank,
        lora_alpha=job.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _lora_layers(peft_model, module_names):
    """module name in the base model -> the PEFT LoRA layer wrapping it."""
    layers = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            base_name = name.removeprefix("base_model.model.")
            if base_name in module_names:
                layers[base_name] = module
    return layers


@torch.no_grad()
def _initialise_lora(layers, job: ClientJob, scaling: float) -> None:
    for name, layer in layers.items():
        A = layer.lora_A["default"].weight
        B = layer.lora_B["default"].weight
        if job.init_factors is not None:
            B_eff, A_init = job.init_factors[name]
            # Rows beyond the global rank keep PEFT's random A with a zero B: no effect yet.
            r = min(job.rank, B_eff.shape[1])
            B.zero_()
            B[:, :r] = torch.from_numpy(B_eff[:, :r] / scaling).to(B)
            A[:r] = torch.from_numpy(A_init[:r]).to(A)
        if job.frozen_A is not None:
            A.copy_(torch.from_numpy(job.frozen_A[name][: job.rank]).to(A))
            A.requires_grad_(False)


def _extract_factors(layers, scaling: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    factors = {}
    for name, layer in layers.items():
        B = layer.lora_B["default"].weight.detach().float() * scaling
        A = layer.lora_A["default"].weight.detach().float()
        factors[name] = (B.cpu().numpy().copy(), A.cpu().numpy().copy())
    return factors


def train_client(base_model, module_names, job: ClientJob, cfg: ExperimentConfig, device: torch.device) -> ClientUpdate:
    """Wrap the shared base with a fresh LoRA, train it locally, return its factors.

    The base weights are frozen and the LoRA layers are removed afterwards, so
    the next virtual client on this rank starts from the same base.
    """
    import deepspeed
    import peft

    seed = derive_seed(cfg.run.seed, job.round_index, job.client_id, Stream.LORA_INIT)
    torch.manual_seed(seed)
    scaling = job.alpha / job.rank
    peft_model = peft.get_peft_model(base_model, _lora_config(job, cfg))
    engine = None
    try:
        layers = _lora_layers(peft_model, module_names)
        _initialise_lora(layers, job, scaling)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = _optimizer(trainable, cfg)
        # DeepSpeed would otherwise pick GPU LOCAL_RANK, which need not exist (one visible GPU per task).
        args = SimpleNamespace(device_rank=device.index) if device.type == "cuda" else None
        with contextlib.redirect_stdout(io.StringIO()):
            engine, *_ = deepspeed.initialize(args=args, model=peft_model, optimizer=optimizer,
                                              config=deepspeed_config(cfg, device))
        engine.train()
        loss = _local_steps(engine, job, cfg, device, base_model)
        fault = client_fault(job.client_id, job.round_index)
        if fault in ("crash", "exit"):  # the moment of failure, for tests of how fast the job ends
            print(f"[fault] {fault} injected at {time.time():.3f}", file=sys.stderr, flush=True)
        if fault == "raise":
            raise ClientTrainingError(f"injected failure ({FAULT_ENV})")
        if fault == "crash":
            raise RuntimeError(f"injected fatal error ({FAULT_ENV})")
        if fault == "exit":
            os._exit(17)  # simulates a killed rank
        factors = _extract_factors(layers, scaling)
        if fault == "nan":
            first = next(iter(factors))
            factors[first][0][0, 0] = np.nan
        return ClientUpdate(job.client_id, len(job.encoded), job.rank, loss, factors)
    finally:
        del engine
        peft_model.unload()  # removes the LoRA layers, leaving the base modules in place
        gc.collect()


def _optimizer(parameters, cfg: ExperimentConfig):
    train = cfg.train
    if train.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.AdamW(parameters, lr=train.lr, weight_decay=train.weight_decay)


def local_batches(cfg: ExperimentConfig, encoded: list, round_index: int, client_id: int) -> list[list[int]]:
    """Example indices of each micro-batch a client trains on in a round; from (seed, round, client) only."""
    generator = torch.Generator().manual_seed(derive_seed(cfg.run.seed, round_index, client_id, Stream.DATA_ORDER))
    return data_lib.sample_batches(encoded, cfg.train.micro_batch_size, num_local_batches(cfg, len(encoded)), generator)


def local_tokens(cfg: ExperimentConfig, encoded: list, round_index: int, client_id: int) -> int:
    """Tokens a client's local work processes in a round, padding included (the micro-batches are
    right-padded to their longest example, and the device computes every position)."""
    batches = local_batches(cfg, encoded, round_index, client_id)
    return sum(len(batch) * max(len(encoded[i][0]) for i in batch) for batch in batches)


def _local_steps(engine, job: ClientJob, cfg: ExperimentConfig, device: torch.device, base_model) -> float:
    batches = local_batches(cfg, job.encoded, job.round_index, job.client_id)
    pad_id = base_model.config.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    losses = []
    for indices in batches:
        batch = data_lib.collate([job.encoded[i] for i in indices], pad_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else float("nan")
