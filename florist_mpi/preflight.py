"""Input checks shared by `run` (on rank 0, before any work) and `validate`: settings a new run
cannot work with, and the data, evaluation set and model a config names."""

from __future__ import annotations

from florist_mpi import data as data_lib
from florist_mpi.config import ExperimentConfig
from florist_mpi.errors import UserError
from florist_mpi.evaluation import eval_set_records
from florist_mpi.warmup import client_data


def check_inputs(cfg: ExperimentConfig, download: bool = True) -> bool:
    """This machine's device, data, evaluation set, model and target modules; False if the model was left
    unchecked."""
    check_device(cfg)
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


def check_device(cfg: ExperimentConfig) -> None:
    """`run.device: cuda` needs a CUDA device on this machine (every rank checks its own at start-up too)."""
    from florist_mpi.devices import cuda_visible, no_cuda_message

    if cfg.run.device == "cuda" and not cuda_visible():
        raise UserError(no_cuda_message())


def check_run_settings(cfg: ExperimentConfig) -> None:
    """Settings a new run cannot work with, though a logged config may hold them (checked here,
    not at config validation, so that older logs stay readable)."""
    train = cfg.train
    precision_dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(train.precision)
    if precision_dtype and cfg.model.dtype != precision_dtype:
        raise UserError(
            f"train.precision '{train.precision}' trains in {precision_dtype} but model.dtype is "
            f"'{cfg.model.dtype}': set model.dtype: {precision_dtype} (DeepSpeed casts the shared base "
            "weights to the training precision)"
        )
    if cfg.run.device == "cpu" and (precision_dtype or cfg.model.dtype != "float32"):
        raise UserError(
            f"run.device cpu trains and stores the model in float32, but train.precision is '{train.precision}' "
            f"and model.dtype '{cfg.model.dtype}': set train.precision: fp32 and model.dtype: float32, or "
            "run.device: cuda"
        )
    if train.precision == "bf16" and train.zero_stage == 0 and train.gradient_accumulation_steps > 1:
        raise UserError(
            f"train.precision bf16 at train.zero_stage 0 would sum {train.gradient_accumulation_steps} micro-batches' "
            "gradients in bfloat16 (DeepSpeed accumulates in fp32 only from stage 1): set train.zero_stage: 1 "
            "(in a client's world of one it costs about what stage 0 costs) or train.gradient_accumulation_steps: 1"
        )
