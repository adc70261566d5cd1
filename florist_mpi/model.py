"""The base model: building or loading it, finding adapted modules, merging updates.

The tiny Llama-style model is built from the config with seeded random weights
and a tokenizer trained locally, so the default run needs no download. Rank 0
builds it (or takes it from the cache) and broadcasts the bytes, so every rank
starts from bit-identical weights without needing a shared file system.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from florist_mpi.config import ExperimentConfig
from florist_mpi.errors import UserError

CACHE_ENV = "FLORIST_MPI_CACHE"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "florist_mpi")


@contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock; released by the OS even if the holder is killed."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def quiet_libraries(verbose: bool = False) -> None:
    """Keep the ranks' output to florist_mpi's own lines (library bars and notices off)."""
    import warnings

    import transformers

    if verbose:
        return
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


# ------------------------------------------------------------------------- threads


def cores_for_rank(local_size: int) -> int:
    """Cores this rank may use: the scheduler's word first, else an even share of the node."""
    for variable in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        value = os.environ.get(variable, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 1
    # Under mpirun the affinity mask may already be this rank's share.
    total = os.cpu_count() or available
    share = available if available < total else total // max(1, local_size)
    return max(1, share)


# ---------------------------------------------------------------------- base model


def _tiny_cache_key(cfg: ExperimentConfig) -> str:
    from florist_mpi.warmup import base_data_clients

    spec = {
        "tiny": cfg.model.tiny.model_dump(),
        "seed": cfg.model.base_seed(cfg.run.seed),
        "warmup_steps": cfg.model.warmup_steps,
        "warmup_lr": cfg.model.warmup_lr,
        "data": cfg.data.model_dump(mode="json"),
        "num_clients": base_data_clients(cfg),  # the clients whose data the base learns from
        "format": 1,
    }
    # Entries that only some configs have are added only for those, so configs without them
    # (no warm-up, the default seed) keep the keys their caches were built under.
    if cfg.model.warmup_steps:
        spec["warmup_batch"] = cfg.train.micro_batch_size  # the warm-up's batch size
    if cfg.model.reserved_fraction():
        spec["warmup_held_out"] = cfg.model.warmup_fraction
    if cfg.model.warmup_steps and cfg.model.warmup_text != "examples":
        spec["warmup_text"] = cfg.model.warmup_text
    if cfg.model.seed is not None and _base_follows_run_seed(cfg):
        spec["run_seed"] = cfg.run.seed
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _base_follows_run_seed(cfg: ExperimentConfig) -> bool:
    """Whether the base (its tokenizer's and warm-up's data) changes with run.seed: generated data, or a
    seeded partition that the warm-up pools; per-client files and a set-aside chosen before the partition do not."""
    if cfg.data.source == "synthetic":
        return True
    return cfg.data.partition != "files" and not cfg.model.reserved_fraction()


def _tiny_llama_config(cfg: ExperimentConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    from transformers import LlamaConfig

    tiny = cfg.model.tiny
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_attention_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
    )


def build_tiny_model(cfg: ExperimentConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.model.base_seed(cfg.run.seed))
    return LlamaForCausalLM(_tiny_llama_config(cfg, vocab_size, pad_id, bos_id, eos_id))


def check_model_and_targets(cfg: ExperimentConfig, download: bool = True) -> bool:
    """Fail early (rank 0, before any work) if the model cannot be found or no module is adapted.

    Only the model's config is read; the architecture is instantiated on the meta device,
    so this costs no weights and no memory. With `download=False` a Hugging Face id that is
    not in the local cache is left unchecked (returns False) instead of failing.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    name = cfg.model.name
    if name == "tiny":
        config = _tiny_llama_config(cfg, cfg.model.tiny.vocab_size, 0, 1, 2)
    else:
        path = Path(name).expanduser()
        looks_local = name.startswith((".", "/", "~")) or (os.sep in name and path.exists())
        if looks_local and not (path / "config.json").is_file():
            raise UserError(f"model.name '{name}' is not a model directory (no config.json): give a local model "
                            "path, a Hugging Face id, or 'tiny'")
        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code,
                                                local_files_only=not download)
        except (OSError, ValueError) as err:
            if not download and not looks_local:
                return False
            raise _model_error(name, err) from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    except Exception:  # noqa: BLE001 - an architecture that cannot be built without weights: checked at load
        return True
    adapted_modules(model, cfg.lora.target_modules)
    return True


def _model_error(name: str, err: BaseException) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
    return UserError(
        f"cannot load model '{name}' ({first[:160]}): set model.name to a local model directory, "
        "a reachable Hugging Face id, or 'tiny'"
    )


def _build_tiny_artifacts(cfg: ExperimentConfig, directory: Path) -> None:
    """Train the tokenizer, build the model, optionally warm it up; save to `directory`."""
    from florist_mpi import data as data_lib
    from florist_mpi.warmup import base_data_clients, training_split, warm_up

    # The tokenizer learns from the warm-up's data: the client data, or only the set-aside share
    # (of at most warmup.TOKENIZER_CLIENTS clients when there is no warm-up).
    records = training_split(cfg, base_data_clients(cfg))[1]
    vocab = cfg.data.tokenizer_vocab_size or cfg.model.tiny.vocab_size
    tokenizer = data_lib.build_tokenizer(records, vocab)
    model = build_tiny_model(
        cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    if cfg.model.warmup_steps:
        warm_up(model, tokenizer, records, cfg)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, directory)


def ensure_tiny_artifacts(cfg: ExperimentConfig) -> Path:
    directory = cache_root() / "tiny" / _tiny_cache_key(cfg)
    if not (directory / "config.json").is_file():
        with file_lock(directory.with_name(directory.name + ".lock")):
            if not (directory / "config.json").is_file():
                _build_tiny_artifacts(cfg, directory)
    return directory


def _directory_bytes(directory: Path) -> bytes:
    files = {p.name: p.read_bytes().hex() for p in sorted(directory.iterdir()) if p.is_file()}
    return json.dumps(files).encode()


def _materialise(payload: bytes, key: str) -> Path:
    """Write broadcast artifacts into this process's cache (atomic, idempotent)."""
    directory = cache_root() / "tiny" / key
    if (directory / "config.json").is_file():
        return directory
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, content in json.loads(payload).items():
        (tmp / name).write_bytes(bytes.fromhex(content))
    try:
        os.replace(tmp, directory)
    except OSError:  # another rank on this node got there first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_base(cfg: ExperimentConfig, world, device: torch.device):
    """The base model (eval mode, frozen) and its tokenizer, identical on every rank."""
    from florist_mpi import comm

    if cfg.model.name == "tiny":
        key = _tiny_cache_key(cfg)
        payload = _directory_bytes(ensure_tiny_artifacts(cfg)) if world.is_root else None
        if world.size > 1:
            payload = comm.bcast_bytes(world, payload)
        directory = cache_root() / "tiny" / key if world.is_root else _materialise(payload, key)
        return _load_pretrained(str(directory), cfg, device, local_only=True)
    return _load_pretrained(cfg.model.name, cfg, device, local_only=False)


def load_options(cfg: ExperimentConfig, device: torch.device, local_only: bool) -> dict:
    """`from_pretrained` keywords: the run's dtype on GPU (float32 on CPU); on GPU every weight goes
    straight from the checkpoint to the device (`device_map`), never a whole model in host memory."""
    options = {"local_files_only": local_only, "trust_remote_code": cfg.model.trust_remote_code}
    if device.type == "cuda":
        return {**options, "dtype": DTYPES[cfg.model.dtype], "device_map": {"": device.index}}
    return {**options, "dtype": torch.float32}


def _load_pretrained(name: str, cfg: ExperimentConfig, device: torch.device, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, local_files_only=local_only, trust_remote_code=cfg.model.trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(name, **load_options(cfg, device, local_only))
    except (OSError, ValueError) as err:
        raise _model_error(name, err) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)  # a no-op where the weights were loaded onto the device
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, tokenizer


# ------------------------------------------------------------------ adapted modules


def adapted_modules(model, target_modules: list[str]) -> dict[str, torch.nn.Linear]:
    """Linear modules whose last name component is a target, by dotted name, in model order.

    A target that names any other kind of module (an embedding, say) is refused: PEFT would wrap it
    with a LoRA of its own kind, which neither the exchange nor the merges of this package handle.
    """
    matched = [(name, module) for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in target_modules]
    for name, module in matched:
        if not isinstance(module, torch.nn.Linear):
            raise UserError(
                f"lora.target_modules entry '{name.rsplit('.', 1)[-1]}' matches '{name}' "
                f"({module.__class__.__name__}), which is not a linear layer: only nn.Linear layers can be "
                "adapted; remove it from lora.target_modules"
            )
    found = dict(matched)
    if not found:
        raise UserError(
            f"lora.target_modules {target_modules} match no linear layer of the model: "
            "use names such as q_proj, v_proj (see the model's named_modules)"
        )
    return found


def float32_masters(modules: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
    """fp32 copies of the adapted weights that are stored in lower precision (none when fp32).

    A LoRA update is ~1e-3 of the weight: added straight into bfloat16 (8-bit mantissa),
    much of it rounds away, and the loss compounds over rounds. Merges go into these
    copies instead, and the model's weight is their rounding.
    """
    return {
        name: module.weight.detach().float().clone()
        for name, module in modules.items()
        if module.weight.dtype != torch.float32
    }


@torch.no_grad()
def merge_update(
    modules: dict[str, torch.nn.Linear],
    factors: dict[str, tuple[np.ndarray, np.ndarray]],
    masters: dict[str, torch.Tensor] | None = None,
) -> None:
    """W += B @ A for every module (the global update with LoRA scaling folded in)."""
    for name, (B, A) in factors.items():
        weight = modules[name].weight
        if B.shape[1] == 0:
            continue
        delta = update_matrix(B, A, weight.device)
        master = (masters or {}).get(name)
        if master is None:
            weight.add_(delta.to(weight.dtype))
        else:
            master.add_(delta)
            weight.copy_(master)


def update_matrix(B: np.ndarray, A: np.ndarray, device: torch.device) -> torch.Tensor:
    """ΔW = B @ A in float32 on `device` (copies: logged and broadcast buffers are read-only)."""
    return torch.from_numpy(np.array(B, dtype=np.float32)).to(device) @ torch.from_numpy(
        np.array(A, dtype=np.float32)
    ).to(device)


@torch.no_grad()
def weights_digest(modules: dict[str, torch.nn.Linear]) -> bytes:
    """A cheap fingerprint of the adapted weights (exact bytes of a strided sample + fp64 sums)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(modules):
        weight = modules[name].weight.detach().reshape(-1)
        sample = weight[:: max(1, weight.numel() // 4096)].float().cpu().numpy()
        sums = torch.stack([weight.double().sum(), weight.double().square().sum()]).cpu().numpy()
        digest.update(name.encode())
        digest.update(sample.tobytes())
        digest.update(sums.tobytes())
    return digest.digest()
