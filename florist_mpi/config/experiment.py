"""The whole experiment: every section, their cross-checks, and the config text a log keeps."""
from __future__ import annotations

import yaml
from pydantic import Field, model_validator

from florist_mpi.config.base import Section
from florist_mpi.config.data import DataConfig
from florist_mpi.config.federation import FederationConfig
from florist_mpi.config.model import LoraConfig, ModelConfig
from florist_mpi.config.run import EvalConfig, LogConfig, RunConfig
from florist_mpi.config.system import SystemConfig
from florist_mpi.config.train import TrainConfig


class ExperimentConfig(Section):
    run: RunConfig = Field(RunConfig(), description="rounds, seed and the log file")
    federation: FederationConfig = Field(FederationConfig(), description="clients, sampling and aggregation")
    model: ModelConfig = Field(ModelConfig(), description="the base model")
    lora: LoraConfig = Field(LoraConfig(), description="the clients' LoRA adapters")
    data: DataConfig = Field(DataConfig(), description="training and held-out data, tokenisation")
    train: TrainConfig = Field(TrainConfig(), description="each client's local training (DeepSpeed)")
    eval: EvalConfig = Field(EvalConfig(), description="evaluation of the global model")
    log: LogConfig = Field(LogConfig(), description="what the HDF5 log stores beyond the defaults")
    system: SystemConfig | None = Field(
        None, description="simulated deployment clock (device speeds, bandwidths, deadline); absent: no simulation"
    )

    @model_validator(mode="after")
    def _cross_checks(self):
        fed, lora = self.federation, self.lora
        if lora.ranks is not None and len(lora.ranks) != fed.num_clients:
            raise ValueError(
                f"lora.ranks has {len(lora.ranks)} entries but federation.num_clients is "
                f"{fed.num_clients}; give one rank per client or use lora.rank"
            )
        if fed.participants_per_round() > fed.num_clients:
            raise ValueError(
                f"federation.clients_per_round ({fed.clients_per_round}) exceeds "
                f"federation.num_clients ({fed.num_clients})"
            )
        if fed.overcommit and self.system is None:
            raise ValueError(
                "federation.overcommit needs a system section: the simulated clock decides which "
                "clients finish first (add system:, see docs/configuration.md, or drop overcommit)"
            )
        if self.system is not None:
            for key, profile in self.system.profiles().items():
                if isinstance(profile, list) and len(profile) != fed.num_clients:
                    raise ValueError(
                        f"system.{key} lists {len(profile)} values but federation.num_clients is "
                        f"{fed.num_clients}: give one value per client"
                    )
        return self

    def to_yaml(self) -> str:
        tree = self.model_dump(mode="json")
        # Keys of the simulated clock are left out when unused, so that logs of runs without
        # it hold the same config text as before the clock existed.
        if tree["system"] is None:
            del tree["system"]
        if tree["federation"]["overcommit"] is None:
            del tree["federation"]["overcommit"]
        # Likewise the device keys at their defaults (a log of a default run reads as before they existed).
        for section, key, default in UNLOGGED_DEFAULTS:
            if tree[section][key] == default:
                del tree[section][key]
        return yaml.safe_dump(tree, sort_keys=False)


# (section, key, default) left out of a logged config at their default (ExperimentConfig.to_yaml)
UNLOGGED_DEFAULTS = (("run", "device", "auto"), ("run", "gpu_memory_fraction", None),
                     ("train", "on_out_of_memory", "error"), ("train", "client_batch", 1),
                     ("federation", "empty_round", "skip"))
