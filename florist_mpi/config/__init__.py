"""Experiment configuration: YAML in, validated pydantic model out.

Every key is validated on load; errors name the dotted key and what to do. The key names
under `run`, `federation`, `lora`, `log` and the section names `model`, `data`, `train`,
`eval` are a public contract (docs/configuration.md). Every field carries its own help text
(`Field(description=...)`), from which docs/configuration.md is generated
(`python -m florist_mpi.configdoc`).

One module per section (run, federation, model, data, train, system), plus:
  base        strict sections, ConfigError, the contract marker
  experiment  ExperimentConfig: every section, the cross-checks, the config text a log keeps
  loading     YAML text or file and `--set` overrides
  resume      the keys a resumed run must keep
"""
from florist_mpi.config.base import CONTRACT, ConfigError, Section
from florist_mpi.config.data import DataConfig, SyntheticDataConfig
from florist_mpi.config.experiment import UNLOGGED_DEFAULTS, ExperimentConfig
from florist_mpi.config.federation import FederationConfig
from florist_mpi.config.loading import config_from_tree, load_config, parse_config_text
from florist_mpi.config.model import ALPHA_PER_RANK, LoraConfig, ModelConfig, TinyModelConfig
from florist_mpi.config.resume import RESUME_FREE, RESUME_KEYS, resume_mismatch
from florist_mpi.config.run import EvalConfig, LogConfig, RunConfig
from florist_mpi.config.system import (
    DISTRIBUTION_HINT,
    PROFILE_KEYS,
    CsvProfile,
    LognormalProfile,
    SystemConfig,
    UniformProfile,
)
from florist_mpi.config.train import TrainConfig

__all__ = [
    "ALPHA_PER_RANK", "CONTRACT", "DISTRIBUTION_HINT", "PROFILE_KEYS", "RESUME_FREE", "RESUME_KEYS",
    "UNLOGGED_DEFAULTS", "ConfigError", "CsvProfile", "DataConfig", "EvalConfig", "ExperimentConfig",
    "FederationConfig", "LogConfig", "LognormalProfile", "LoraConfig", "ModelConfig", "RunConfig", "Section",
    "SyntheticDataConfig", "SystemConfig", "TinyModelConfig", "TrainConfig", "UniformProfile", "config_from_tree",
    "load_config", "parse_config_text", "resume_mismatch",
]
