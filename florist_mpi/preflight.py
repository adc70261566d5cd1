"""Input checks shared by `run` (on rank 0, before any work) and `validate`: settings a new run
cannot work with, and the data, evaluation set and model a config names."""

from __future__ import annotations

from florist_mpi import data as data_lib
from florist_mpi.config import ExperimentConfig
from florist_mpi.errors import UserError
from florist_mpi.evaluation import eval_set_records
from florist_mpi.warmup import client_data


def check_inputs(cfg: ExperimentConfig, download: bool = True) -> bool:
    """Data, evaluation set, model and target modules; False if the model was left unchecked."""
    clients = client_data(cfg)  # files are read (and checked) here; generated clients always hold records
    if not clients.generated:
        for client_id in range(len(clients)):
            if not clients.num_records(client_id):
                raise UserError(
                    f"client {client_id} has no training examples: fix the data split or lower federation.num_clients"
                )
    if cfg.eval.every:
        eval_set_records(cfg)
    if cfg.system is not None:
        data_lib.system_tables(cfg.system, cfg.federation.num_clients)  # CSV profiles: present, one row per client
    from florist_mpi.model import check_model_and_targets  # transformers: imported only when needed

    return check_model_and_targets(cfg, download)


def check_run_settings(cfg: ExperimentConfig) -> None:
    """Settings a new run cannot work with, though a logged config may hold them (checked here,
    not at config validation, so that older logs stay readable)."""
    precision_dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.train.precision)
    if precision_dtype and cfg.model.dtype != precision_dtype:
        raise UserError(
            f"train.precision '{cfg.train.precision}' trains in {precision_dtype} but model.dtype is "
            f"'{cfg.model.dtype}': set model.dtype: {precision_dtype} (DeepSpeed casts the shared base "
            "weights to the training precision)"
        )
