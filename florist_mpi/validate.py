"""`florist-mpi validate`: check a config and its inputs without running anything."""
from __future__ import annotations

from florist_mpi.config import load_config
from florist_mpi.console import rank_histogram
from florist_mpi.preflight import check_inputs, check_run_settings


def add_arguments(parser) -> None:
    parser.add_argument("config", help="experiment YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    parser.add_argument("--no-data", action="store_true",
                        help="check the config only, not the data files and model path it names, nor the CUDA "
                        "device that run.device: cuda needs on this machine")


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    check_run_settings(cfg)
    model_note = ""
    if not args.no_data:
        if not check_inputs(cfg, download=False):
            model_note = " (not in the local cache: not checked, `run` will download it)"
    fed, lora = cfg.federation, cfg.lora
    ranks = lora.ranks if lora.ranks is not None else [lora.rank] * fed.num_clients
    print(
        f"{args.config}: OK | method {fed.method} (tau={fed.tau}) | {fed.num_clients} clients, "
        f"{fed.participants_per_round()} per round | LoRA ranks {rank_histogram(ranks)}, alpha {lora.alpha} on "
        f"{','.join(lora.target_modules)} | model {cfg.model.name}{model_note} | data {cfg.data.source} | "
        f"{cfg.run.rounds} rounds -> {cfg.run.output}"
    )
    return 0
