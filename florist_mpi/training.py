"""Local training of one client: a fresh PEFT LoRA in its own DeepSpeed engine.

Clients never share state through DeepSpeed: each process joins a private
torch.distributed world of size one before DeepSpeed starts, so DeepSpeed has
no peer to all-reduce gradients with. Federated exchange happens over MPI only.

DeepSpeed still runs its collectives in that world: at every engine's creation it
broadcasts every parameter (the frozen base included), and it all-reduces gradients
at every step. With CUDA tensors in a gloo world each of those goes through pinned
host memory (a whole Llama-7B per fresh engine); in an NCCL world of one they are
no-ops on the device. So a CUDA rank's private world is NCCL (gloo for CPU tensors).
DeepSpeed's own switches to turn its communication off (deepspeed.comm.torch's
`*_comm_off`) cover broadcast but not all_reduce, and log a warning per skipped
call, so they are not used.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from florist_mpi import data as data_lib
from florist_mpi.config import ExperimentConfig, TrainConfig
from florist_mpi.devices import release_memory
from florist_mpi.errors import UserError
from florist_mpi.exchange import ClientUpdate
from florist_mpi.faults import FAULT_ENV, client_fault
from florist_mpi.model import file_lock
from florist_mpi.seeding import Stream, derive_seed


class ClientTrainingError(RuntimeError):
    """A recoverable failure of one client's local training (the round goes on without it)."""


class ClientOutOfMemory(UserError):
    """A client's local training ran out of GPU memory and `train.on_out_of_memory` is `error`."""


# ------------------------------------------------------------ process-level set-up


def private_world_backend(device: torch.device | None) -> str:
    """torch.distributed backend of a rank's private world of one: NCCL for CUDA tensors (DeepSpeed's
    broadcasts and all-reduces are then device no-ops), gloo for CPU tensors."""
    return "cpu:gloo,cuda:nccl" if device is not None and device.type == "cuda" else "gloo"


def isolate_torch_distributed(local_rank: int, device: torch.device | None = None) -> None:
    """A private single-process torch.distributed world for this rank's DeepSpeed engines on `device`."""
    import torch.distributed as dist

    # DeepSpeed reads these. RANK/WORLD_SIZE describe the private world; LOCAL_RANK must
    # equal Open MPI's own number when there is one (DeepSpeed asserts it). The GPU is
    # chosen separately (select_device) and handed to DeepSpeed as its device_rank.
    local = os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", str(local_rank))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=local)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    on_gpu = device is not None and device.type == "cuda"
    if device is not None:
        # DeepSpeed's accelerator is the rank's device: a CPU rank on a GPU machine (run.device: cpu)
        # must not get engines that move the model to a GPU (prepare_deepspeed keeps this choice).
        os.environ["DS_ACCELERATOR"] = "cuda" if on_gpu else "cpu"
    if not dist.is_initialized():
        # device_id binds the NCCL world to this rank's GPU (no stray context on GPU 0)
        bound = {"device_id": device} if on_gpu else {}
        dist.init_process_group(private_world_backend(device), store=dist.HashStore(), rank=0, world_size=1, **bound)


def _quiet_deepspeed() -> None:
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def _ninja_beside_python():
    """Run torch's extension builds with the `ninja` installed beside this interpreter, when there is one.

    torch calls whichever `ninja` is first on PATH, and ninja versions hash the commands in their build
    log differently (1.11 and 1.13 do): processes that alternate between a system ninja and the
    environment's own see each other's builds as out of date and recompile the op every start-up
    (about 10 s on an idle 2-core machine, a minute under load). One ninja per environment, whatever
    the PATH, builds once.
    """
    here = Path(sys.executable).parent
    if not (here / "ninja").is_file():
        yield
        return
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(here), before]) if before else str(here)
    try:
        yield
    finally:
        os.environ["PATH"] = before


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
        with file_lock(extensions / "florist_mpi_build.lock"), _ninja_beside_python():
            for stale in extensions.glob(f"*/{builder.NAME}/lock"):
                stale.unlink(missing_ok=True)
            import deepspeed.ops

            if deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
                builder.load(verbose=False)


def deepspeed_config(train: TrainConfig, device: torch.device, trainable_elements: int | None = None) -> dict:
    """The DeepSpeed config of one client's engine on `device`, training `trainable_elements` LoRA weights."""
    on_gpu = device.type == "cuda"
    bf16 = on_gpu and train.precision == "bf16"
    zero = {"stage": train.zero_stage}
    if train.zero_stage > 0 and trainable_elements:
        # ZeRO's gradient bucket and all-gather chunk default to 5e8 elements: a 1-2 GB buffer per engine
        # for a few MB of LoRA. One bucket of the LoRA's own size (DeepSpeed wants an even count) suffices.
        bucket = trainable_elements + trainable_elements % 2
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # fp32 on CPU: reduced precision there is slow and unsupported by some kernels.
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": on_gpu and train.precision == "fp16"},
    }
    if bf16 and train.zero_stage > 0:
        # Sum the micro-batches' gradients in fp32 (DeepSpeed's BF16_Optimizer at stage 1). At stage 0
        # DeepSpeed has no fp32 accumulation: preflight refuses bf16 there with more than one micro-batch.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    # DeepSpeed clips at 1.0 when the key is absent: null (no clipping) must say 0
    config["gradient_clipping"] = train.gradient_clipping or 0.0
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


def num_local_batches(train: TrainConfig, num_examples: int) -> int:
    """Micro-batches of one client's local work: always whole optimizer steps."""
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


def _lora_layers(peft_model, module_names, adapter: str = "default"):
    """module name in the base model -> the PEFT LoRA layer wrapping it (model order)."""
    layers = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and adapter in getattr(module, "lora_A", {}):
            base_name = name.removeprefix("base_model.model.")
            if base_name in module_names:
                layers[base_name] = module
    return layers


@torch.no_grad()
def _initialise_lora(layers, job: ClientJob, scaling: float, adapter: str = "default") -> None:
    """The client's starting point: FlexLoRA's carried-over truncation, FFA-LoRA's frozen A."""
    for name, layer in layers.items():
        A = layer.lora_A[adapter].weight
        B = layer.lora_B[adapter].weight
        start_factors_(A, B, name, job, scaling)
        if job.frozen_A is not None:
            A.requires_grad_(False)


@torch.no_grad()
def start_factors_(A: torch.Tensor, B: torch.Tensor, name: str, job: ClientJob, scaling: float) -> None:
    """Overwrite one module's freshly drawn A (r, n) and B (m, r) with the method's start, in place."""
    if job.init_factors is not None:
        B_eff, A_init = job.init_factors[name]
        # Rows beyond the global rank keep PEFT's random A with a zero B: no effect yet.
        r = min(job.rank, B_eff.shape[1])
        B.zero_()
        B[:, :r] = torch.from_numpy(B_eff[:, :r] / scaling).to(B)
        A[:r] = torch.from_numpy(A_init[:r]).to(A)
    if job.frozen_A is not None:
        A.copy_(torch.from_numpy(job.frozen_A[name][: job.rank]).to(A))


def _extract_factors(layers, scaling: float, adapter: str = "default") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module -> (B_eff m×r, A r×n) float32 copies; B is stored column-major (its transpose is contiguous),
    the layout the exchange stacks without a per-client transpose (exchange.py)."""
    factors = {}
    for name, layer in layers.items():
        B = layer.lora_B[adapter].weight.detach().float() * scaling
        A = layer.lora_A[adapter].weight.detach().float()
        factors[name] = (B.T.contiguous().cpu().numpy().T, A.cpu().numpy().copy())
    return factors


def train_client(base_model, module_names, job: ClientJob, cfg: ExperimentConfig, device: torch.device) -> ClientUpdate:
    """One client on a fresh LoRA wrapper and DeepSpeed engine, both torn down afterwards.

    The base weights are frozen and the LoRA layers are removed afterwards, so the next
    virtual client on this rank starts from the same base. This is the path for engines
    that keep their own copies of the weights (ZeRO 1-2, bf16/fp16); ClientTrainer reuses
    engines where it can.
    """
    return _train_fresh(base_model, module_names, job, cfg, device)[0]


def _train_fresh(base_model, module_names, job: ClientJob, cfg: ExperimentConfig,
                 device: torch.device) -> tuple[ClientUpdate, int]:
    """train_client's update and the optimizer steps its engine skipped (fp16 loss-scale overflow).

    Teardown, in order: the engine is destroyed (DeepSpeed's ZeRO 1-2 and bf16 optimizers hook
    every LoRA weight's gradient accumulator with closures that point back to the optimizer;
    the autograd graph holds those hooks where Python's garbage collector cannot see them, so
    without destroy() no client's LoRA, fp32 copies or optimizer state would ever be freed);
    the LoRA layers are removed; a full garbage collection frees the engine's reference
    cycles; on CUDA the allocator's free blocks go back to the driver, for other ranks on the GPU.
    """
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
        engine = build_engine(peft_model, build_optimizer(trainable, cfg.train), cfg.train, device)
        engine.train()
        loss = _local_steps(engine, job, cfg, device, base_model)
        return client_update(job, _extract_factors(layers, scaling), loss), _skipped_steps(engine, job)
    finally:
        if engine is not None:
            engine.destroy()
        del engine
        peft_model.unload()  # removes the LoRA layers, leaving the base modules in place
        release_memory(device)


def engines_reusable(train: TrainConfig, device: torch.device) -> bool:
    """Whether DeepSpeed trains the LoRA weights in place, so that one engine can serve many clients.

    ZeRO 1-2 and bf16/fp16 engines keep fp32 copies of the weights inside their optimizer,
    which resetting the LoRA weights in place would not reach.
    """
    if train.client_engines == "fresh" or train.zero_stage != 0:
        return False
    return device.type != "cuda" or train.precision == "fp32"


@dataclass
class _Slot:
    """One PEFT adapter with its optimizer and engine, shared by the clients of one (rank, alpha)."""

    adapter: str
    layers: dict  # module name -> PEFT LoRA layer, in model order
    optimizer: torch.optim.Optimizer
    engine: object


class ClientTrainer:
    """Trains a rank's clients one after another on the rank's shared base model.

    Where engines are reusable (engines_reusable), the base is wrapped once; each distinct
    (LoRA rank, alpha) gets one PEFT adapter, optimizer and DeepSpeed engine, built when a
    client first needs them. Before every client its adapter is redrawn exactly as a fresh
    `get_peft_model` would draw it from the client's seed, the optimizer state and engine
    counters are cleared, and between clients the adapters are switched off, so evaluation
    and merges see the plain base. Each client thus gets bitwise the result of a fresh
    wrapper and engine (tests/test_training.py) without paying for one: a new wrapper, a
    new engine and the full garbage collection that returns its memory cost about ten local
    steps of the demo model. Elsewhere every client goes through `train_client`.
    """

    def __init__(self, base_model, module_names, cfg: ExperimentConfig, device: torch.device):
        self.base_model, self.module_names, self.cfg, self.device = base_model, set(module_names), cfg, device
        self.reuse = engines_reusable(cfg.train, device)
        self._peft_model = None
        self._slots: dict[tuple[int, float], _Slot] = {}
        # (round, client) -> optimizer steps skipped on fp16 loss-scale overflow (clients that skipped any)
        self.skipped_steps: dict[tuple[int, int], int] = {}

    def train(self, job: ClientJob) -> ClientUpdate:
        """The client's update. A CUDA out-of-memory error stops the run (ClientOutOfMemory) or, with
        `train.on_out_of_memory: exclude`, becomes a ClientTrainingError: the client is left out."""
        try:
            update, skipped = self._train(job)
        except torch.cuda.OutOfMemoryError as err:  # torch.OutOfMemoryError from torch 2.5 on
            reason = str(err).strip().splitlines()[0] if str(err).strip() else "CUDA out of memory"
        else:
            if skipped:
                self.skipped_steps[job.round_index, job.client_id] = skipped
            return update
        # outside the except block, so that the error's frames (and the tensors they hold) are gone
        release_memory(self.device)
        raise out_of_memory_error(job, self.cfg.train, reason)

    def _train(self, job: ClientJob) -> tuple[ClientUpdate, int]:
        if not self.reuse:
            return _train_fresh(self.base_model, self.module_names, job, self.cfg, self.device)
        slot = self._slot(job)
        scaling = job.alpha / job.rank
        self._activate(slot, frozen_A=job.frozen_A is not None)
        try:
            torch.manual_seed(derive_seed(self.cfg.run.seed, job.round_index, job.client_id, Stream.LORA_INIT))
            _redraw_as_fresh_wrap(slot)
            _initialise_lora(slot.layers, job, scaling, slot.adapter)
            slot.engine.train()
            loss = _local_steps(slot.engine, job, self.cfg, self.device, self.base_model)
            update = client_update(job, _extract_factors(slot.layers, scaling, slot.adapter), loss)
            return update, _skipped_steps(slot.engine, job)
        finally:
            clear_training_state(slot)
            self._peft_model.base_model.disable_adapter_layers()  # the plain base until the next client

    def _slot(self, job: ClientJob) -> _Slot:
        key = (job.rank, float(job.alpha))
        if key not in self._slots:
            import peft

            adapter = f"r{job.rank}_alpha{job.alpha:g}"
            config = _lora_config(job, self.cfg)
            if self._peft_model is None:
                self._peft_model = peft.get_peft_model(self.base_model, config, adapter_name=adapter)
            else:
                self._peft_model.add_adapter(adapter, config)
            layers = _lora_layers(self._peft_model, self.module_names, adapter)
            self._activate_layers(adapter, frozen_A=job.frozen_A is not None)
            trainable = [p for layer in layers.values()
                         for p in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight) if p.requires_grad]
            optimizer = build_optimizer(trainable, self.cfg.train)
            engine = build_engine(self._peft_model, optimizer, self.cfg.train, self.device)
            if engine.optimizer is not optimizer:
                raise RuntimeError(
                    "DeepSpeed wrapped the optimizer of a reused engine: set train.client_engines: fresh"
                )
            self._slots[key] = _Slot(adapter, layers, optimizer, engine)
        return self._slots[key]

    def _activate(self, slot: _Slot, frozen_A: bool) -> None:
        self._peft_model.base_model.enable_adapter_layers()
        self._activate_layers(slot.adapter, frozen_A)

    def _activate_layers(self, adapter: str, frozen_A: bool) -> None:
        """Make `adapter` the one PEFT runs and trains (FFA-LoRA: B only)."""
        self._peft_model.set_adapter(adapter)
        if frozen_A:
            for name, module in self._peft_model.named_modules():
                if hasattr(module, "lora_A") and adapter in module.lora_A:
                    module.lora_A[adapter].weight.requires_grad_(False)


def out_of_memory_error(job: ClientJob, train: TrainConfig, reason: str) -> Exception:
    """What a client's CUDA out-of-memory error becomes under `train.on_out_of_memory`."""
    if train.on_out_of_memory == "exclude":
        return ClientTrainingError(f"out of GPU memory ({reason[:200]})")
    return ClientOutOfMemory(
        f"client {job.client_id} ran out of GPU memory in round {job.round_index} ({reason[:200]}): lower "
        "train.micro_batch_size or data.max_length, put fewer ranks on each GPU, or set "
        "train.on_out_of_memory: exclude to leave such clients out of their round"
    )


def _skipped_steps(engine, job: ClientJob) -> int:
    """Optimizer steps the engine skipped this client (fp16 loss-scale overflow), said on stderr when any.

    Every fresh fp16 engine starts from DeepSpeed's initial loss scale: carrying a scale from one
    client to the next would make a client's result depend on which clients its rank trained before.
    """
    skipped = int(getattr(engine, "skipped_steps", 0) or 0)
    if skipped:
        steps = int(getattr(engine, "global_steps", 0) or 0)
        print(f"florist-mpi: warning: client {job.client_id} skipped {skipped} of {steps} optimizer steps in round "
              f"{job.round_index} (fp16 loss-scale overflow)", file=sys.stderr, flush=True)
    return skipped


@torch.no_grad()
def _redraw_as_fresh_wrap(slot: _Slot) -> None:
    """The slot's initial LoRA weights, drawn as `get_peft_model` draws them.

    For each adapted layer, in model order, PEFT builds nn.Linear(n, r) and nn.Linear(r, m)
    (each drawing its default init, kaiming-uniform with a = sqrt(5), from the global
    generator), then redraws A the same way and zeroes B; it then moves the adapter to its
    base layer's dtype (rounding A to bfloat16 on a bfloat16 base) before casting it back to
    float32. The same draws in the same order, from the same seed, rounded the same way, give
    the reused adapter bitwise a fresh wrapper's start.
    """
    for layer in slot.layers.values():
        A, B = layer.lora_A[slot.adapter].weight, layer.lora_B[slot.adapter].weight
        fresh = fresh_lora_A(*A.shape, B.shape[0])
        base_dtype = layer.get_base_layer().weight.dtype  # a fresh wrap rounds A through the base's dtype
        A.copy_(fresh.to(base_dtype) if base_dtype.is_floating_point else fresh)
        B.zero_()


def fresh_lora_A(r: int, n: int, m: int) -> torch.Tensor:
    """A fresh wrapper's A (r, n) of one layer, drawn from the global generator as PEFT draws it."""
    fresh = torch.empty(r, n)
    torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))  # nn.Linear(n, r)'s own init (PEFT's lora_A)
    torch.nn.init.kaiming_uniform_(torch.empty(m, r), a=math.sqrt(5))  # nn.Linear(r, m)'s (lora_B)
    torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))  # PEFT's reset_lora_parameters
    return fresh


def clear_training_state(slot: _Slot) -> None:
    """Nothing of this client may reach the next one: gradients, optimizer moments, step counts."""
    slot.optimizer.zero_grad(set_to_none=True)
    slot.optimizer.state.clear()
    engine = slot.engine
    engine.global_steps = engine.global_samples = engine.micro_steps = engine.skipped_steps = 0


def build_engine(model, optimizer, train: TrainConfig, device: torch.device):
    """A DeepSpeed engine of a private world of one (see isolate_torch_distributed)."""
    import deepspeed

    # DeepSpeed would otherwise pick GPU LOCAL_RANK, which need not exist (one visible GPU per task).
    args = SimpleNamespace(device_rank=device.index) if device.type == "cuda" else None
    trainable = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(
            args=args, model=model, optimizer=optimizer, config=deepspeed_config(train, device, trainable)
        )
    return engine


def client_update(job: ClientJob, factors: dict, loss: float) -> ClientUpdate:
    """The trained client's upload, after any injected fault (docs/fault-injection.md)."""
    fault = client_fault(job.client_id, job.round_index)
    if fault in ("crash", "exit"):  # the moment of failure, for tests of how fast the job ends
        print(f"[fault] {fault} injected at {time.time():.3f}", file=sys.stderr, flush=True)
    if fault == "raise":
        raise ClientTrainingError(f"injected failure ({FAULT_ENV})")
    if fault == "crash":
        raise RuntimeError(f"injected fatal error ({FAULT_ENV})")
    if fault == "exit":
        os._exit(17)  # simulates a killed rank
    if fault == "nan":
        first = next(iter(factors))
        factors[first][0][0, 0] = np.nan
    return ClientUpdate(job.client_id, len(job.encoded), job.rank, loss, factors)


def build_optimizer(parameters, train: TrainConfig):
    if train.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.AdamW(parameters, lr=train.lr, weight_decay=train.weight_decay)


def local_batches(cfg: ExperimentConfig, encoded: list, round_index: int, client_id: int) -> list[list[int]]:
    """Example indices of each micro-batch a client trains on in a round; from (seed, round, client) only."""
    generator = torch.Generator().manual_seed(derive_seed(cfg.run.seed, round_index, client_id, Stream.DATA_ORDER))
    batches = num_local_batches(cfg.train, len(encoded))
    return data_lib.sample_batches(encoded, cfg.train.micro_batch_size, batches, generator)


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

