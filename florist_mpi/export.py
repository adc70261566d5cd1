"""`florist-mpi export`: a round's cumulative global update as a standard PEFT adapter.

The cumulative update of module W after round R is Σ_{t≤R} B_t A_t (FlexLoRA: the
round-R global update, since it never merges). Its factors are compressed exactly
(FLoRIST at τ = 1 over the rounds, so the rank is the true rank of the sum) and
written with one rank per module through PEFT's `rank_pattern`, with
`alpha_pattern` = rank so that PEFT's scaling α/r is exactly 1. Modules whose
cumulative update is zero are left out of the adapter.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from florist_mpi import storage
from florist_mpi.config import parse_config_text
from florist_mpi.errors import UserError
from florist_mpi.replay import load_initial_base


def add_arguments(parser) -> None:
    parser.add_argument("log", help="run log (.h5)")
    parser.add_argument("--round", type=int, default=None, help="last round to include (default: the last completed)")
    parser.add_argument("--out", required=True, help="directory to write (must not exist, or be empty)")
    parser.add_argument("--no-base", action="store_true",
                        help="for the tiny model: do not also write the base model to OUT/base_model")


def cumulative_update(log_path, round_index: int | None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int, object]:
    """(module -> (B, A) with B @ A the cumulative ΔW, the round used, the run's config)."""
    from florist_mpi.aggregation import aggregate

    with storage.open_log(log_path) as handle:
        cfg = parse_config_text(storage.decode_str(handle.attrs["config"]), source=f"log '{log_path}'")
        rounds = storage.completed_rounds(handle)
        if not rounds:
            raise UserError(f"log '{log_path}' holds no completed round yet: nothing to export")
        if round_index is None:
            round_index = rounds[-1]
        if round_index not in rounds:
            raise UserError(f"round {round_index} is not in log '{log_path}' (it has rounds {rounds[0]}..{rounds[-1]})")
        included = [round_index] if cfg.federation.method == "flexlora" else [r for r in rounds if r <= round_index]
        per_round = [storage.read_global_factors(handle, r) for r in included]
        modules = storage.read_modules(handle)
    result = {}
    for module in modules:
        pairs = [(torch.from_numpy(f[module][0]).double(), torch.from_numpy(f[module][1]).double()) for f in per_round]
        pairs = [(B, A) for B, A in pairs if B.shape[1] > 0]
        if not pairs:
            continue
        # Equal weights average the pairs; scaling each B by their number turns that into the sum.
        scaled = [(B * len(pairs), A) for B, A in pairs]
        summed = aggregate("florist", scaled, [1.0] * len(pairs), tau=1.0)
        if summed.rank > 0:
            result[module] = (summed.B.float().numpy(), summed.A.float().numpy())
    return result, round_index, cfg


def _prepare_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out '{out}' already exists and is not an empty directory: choose a new directory")


def write_adapter(model, factors: dict[str, tuple[np.ndarray, np.ndarray]], out: Path) -> None:
    import peft

    if not factors:
        raise UserError("the cumulative update is zero in every module: there is no adapter to export")
    ranks = {name: int(B.shape[1]) for name, (B, _) in factors.items()}
    patterns = {re.escape(name): r for name, r in ranks.items()}
    config = peft.LoraConfig(
        r=max(ranks.values()), lora_alpha=max(ranks.values()), target_modules=sorted(ranks),
        rank_pattern=patterns, alpha_pattern=dict(patterns), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
    )
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            base_name = name.removeprefix("base_model.model.")
            if base_name in factors and hasattr(module, "lora_A"):
                B, A = factors[base_name]
                module.lora_B["default"].weight.copy_(torch.from_numpy(B))
                module.lora_A["default"].weight.copy_(torch.from_numpy(A))
    peft_model.save_pretrained(out, safe_serialization=True)
    peft_model.unload()


def main(args) -> int:
    out = Path(args.out)
    _prepare_out(out)
    factors, round_index, cfg = cumulative_update(args.log, args.round)
    model, tokenizer = load_initial_base(cfg)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if cfg.model.name == "tiny" and not args.no_base:
            model.save_pretrained(tmp / "base_model", safe_serialization=True)
            tokenizer.save_pretrained(tmp / "base_model")
        write_adapter(model, factors, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "florist_export.json").write_text(json.dumps({
            "log": str(Path(args.log).resolve()), "round": round_index, "method": cfg.federation.method,
            "modules": {name: int(B.shape[1]) for name, (B, _) in factors.items()},
            "base_model": "base_model" if cfg.model.name == "tiny" and not args.no_base else cfg.model.name,
        }, indent=2))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ranks = [int(B.shape[1]) for B, _ in factors.values()]
    print(f"exported round {round_index} ({cfg.federation.method}): {len(factors)} modules, ranks "
          f"{min(ranks)}..{max(ranks)} -> {out}")
    return 0
