"""`florist-mpi export`: a round's cumulative global update as a standard PEFT adapter.

    florist-mpi export runs/demo.h5 --out runs/demo-adapter [--round R] [--no-base]

The cumulative update of module W after round R is Σ_{t≤R} B_t A_t (FlexLoRA and HetLoRA:
the round-R global update, since they never merge; FedEx-LoRA: the residuals of rounds ≤ R,
merged into the base, plus the round-R B @ A kept beside it). Its factors are compressed exactly
(FLoRIST at τ = 1 over the rounds, so the rank is the true rank of the sum) and
written with one rank per module through PEFT's `rank_pattern`, with
`alpha_pattern` = rank so that PEFT's scaling α/r is exactly 1. Modules whose
cumulative update is zero are left out of the adapter.

The adapter is written directly (adapter_model.safetensors with PEFT's key names and
adapter_config.json from peft.LoraConfig), so no base model is loaded; for the tiny
model, whose weights exist only in the local cache, the base and its tokenizer are
copied into OUT/base_model unless --no-base.

rank_pattern keys are the modules' full names (`model.layers.0.self_attn.q_proj`,
`lm_head`), not regular expressions: PEFT 0.13 and 0.14 find a full name only by exact
lookup (their pattern needs a "." before the key), PEFT >= 0.15 also as a pattern, where
"." matches itself; longest names come first so that no name can claim a longer one
ending in it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from florist_mpi import methods
from florist_mpi.analysis import Run, check_new_output_dir, open_run, publishing_dir
from florist_mpi.errors import UserError

PEFT_PREFIX = "base_model.model."  # PEFT's name for the wrapped model in saved adapter keys


def add_arguments(parser) -> None:
    parser.add_argument("log", help="run log (.h5)")
    parser.add_argument("--round", type=int, default=None,
                        help="last round to include (default: the last completed; negative values count from the end)")
    parser.add_argument("--out", required=True, help="directory to write (must not exist, or be empty)")
    parser.add_argument("--no-base", action="store_true",
                        help="for the tiny model: do not also write the base model to OUT/base_model")


def cumulative_update(run: Run, round_index: int | None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """(module -> (B, A) float32 with B @ A the cumulative ΔW up to the round, the round used)."""
    from florist_mpi.aggregation import aggregate

    r = run.resolve_round(round_index)
    # a method that keeps the base logs the whole update each round (the last round that aggregated a
    # client holds it); the others log increments (a round that aggregated nobody logs rank 0)
    included = [t for t in run.round_indices if t <= r]
    method = methods.get(run.method)
    # FedEx-LoRA merged every round's residual into the base and kept the last B @ A beside it
    per_round = [run.residual_factors(t) for t in included] if method.folds_residual else []
    if method.keeps_base:
        included = [t for t in included if run.rounds.loc[t, "num_clients"] > 0][-1:]
    per_round += [run.global_factors(t) for t in included]
    result = {}
    for module in run.modules:
        pairs = [(torch.from_numpy(f[module][0]).double(), torch.from_numpy(f[module][1]).double())
                 for f in per_round if module in f]
        pairs = [(B, A) for B, A in pairs if B.shape[1] > 0]
        if not pairs:
            continue
        # Equal weights average the pairs; scaling each B by their number turns that into the sum.
        scaled = [(B * len(pairs), A) for B, A in pairs]
        summed = aggregate("florist", scaled, [1.0] * len(pairs), tau=1.0)
        if summed.rank > 0:
            result[module] = (summed.B.float().numpy(), summed.A.float().numpy())
    return result, r


def adapter_config(factors: dict[str, tuple[np.ndarray, np.ndarray]], base_model: str):
    """The peft.LoraConfig of the adapter: each module's own rank, scaling α/r = 1."""
    import peft

    ranks = {name: int(B.shape[1]) for name, (B, _) in factors.items()}
    # Full names, longest first (see the module docstring for why not regular expressions).
    patterns = {name: ranks[name] for name in sorted(ranks, key=lambda n: (-len(n), n))}
    return peft.LoraConfig(
        r=max(ranks.values()), lora_alpha=max(ranks.values()), target_modules=sorted(ranks),
        rank_pattern=patterns, alpha_pattern=dict(patterns), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def adapter_tensors(factors: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """PEFT's saved state dict: `base_model.model.<module>.lora_A.weight` (r × n) and `.lora_B.weight` (m × r)."""
    tensors = {}
    for name, (B, A) in factors.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.from_numpy(np.array(A, dtype=np.float32))
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.from_numpy(np.array(B, dtype=np.float32))
    return tensors


def write_adapter(factors: dict[str, tuple[np.ndarray, np.ndarray]], out: Path, base_model: str) -> None:
    """adapter_config.json and adapter_model.safetensors, as PeftModel.save_pretrained writes them."""
    from safetensors.torch import save_file

    if not factors:
        raise UserError("the cumulative update is zero in every module: there is no adapter to export")
    adapter_config(factors, base_model).save_pretrained(str(out))
    save_file(adapter_tensors(factors), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def copy_tiny_base(cfg, target: Path) -> None:
    """The tiny base model and its tokenizer, exactly the files every run loads (model.ensure_tiny_artifacts)."""
    from florist_mpi.model import ensure_tiny_artifacts

    shutil.copytree(ensure_tiny_artifacts(cfg), target)


def copy_tiny_tokenizer(cfg, target: Path) -> None:
    from florist_mpi.model import ensure_tiny_artifacts

    for path in sorted(ensure_tiny_artifacts(cfg).iterdir()):
        if path.is_file() and (path.name.startswith("tokenizer") or path.name == "special_tokens_map.json"):
            shutil.copy2(path, target / path.name)


def main(args) -> int:
    run = open_run(args.log)
    round_index = run.resolve_round(args.round)  # log and round problems are reported before folder ones
    out = check_new_output_dir(Path(args.out), f"--out '{args.out}'")
    factors, round_index = cumulative_update(run, round_index)
    cfg = run.config
    tiny = cfg.model.name == "tiny"
    with_base = tiny and not args.no_base
    base_model = str(out.resolve() / "base_model") if with_base else cfg.model.name
    with publishing_dir(out) as scratch:
        write_adapter(factors, scratch, base_model)
        if with_base:
            copy_tiny_base(cfg, scratch / "base_model")
        if tiny:  # the tiny model's tokenizer exists only locally; other models bring their own
            copy_tiny_tokenizer(cfg, scratch)
        (scratch / "florist_export.json").write_text(json.dumps({
            "log": str(run.path.resolve()), "round": round_index, "method": run.method,
            "modules": {name: int(B.shape[1]) for name, (B, _) in factors.items()},
            "base_model": "base_model" if with_base else cfg.model.name,
        }, indent=2))
    ranks = [int(B.shape[1]) for B, _ in factors.values()]
    print(f"exported round {round_index} ({run.method}): {len(factors)} modules, ranks "
          f"{min(ranks)}..{max(ranks)} -> {out}")
    return 0
