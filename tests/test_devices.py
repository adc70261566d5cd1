"""run.device and the CUDA paths, tested on CPU: device choice, the all-gathered agreement, timing,
memory, the private world, the DeepSpeed config, out-of-memory handling and the refusals."""
import importlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, florist_cli, mpi_env, run_mpi

from florist_mpi import devices
from florist_mpi.config import ConfigError, config_from_tree
from florist_mpi.errors import UserError
from florist_mpi.preflight import check_device, check_run_settings
from florist_mpi.training import (
    ClientJob,
    ClientOutOfMemory,
    ClientTrainer,
    ClientTrainingError,
    deepspeed_config,
    private_world_backend,
)

CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def four_gpus(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


# ------------------------------------------------------------------------ choosing


def test_auto_without_cuda_is_cpu_and_cuda_without_cuda_is_refused(no_cuda):
    assert devices.select_device(3, "auto") == torch.device("cpu")
    with pytest.raises(UserError, match="run.device is cuda but rank 3.*sees no CUDA device.*run.device: auto or cpu"):
        devices.select_device(3, "cuda")


def test_cpu_never_asks_for_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("run.device cpu looked for CUDA"))
    assert devices.select_device(0, "cpu") == torch.device("cpu")


def test_gpus_are_chosen_by_node_local_rank(four_gpus):
    assert [devices.select_device(r, "cuda") for r in (0, 5, 3)] == [CUDA0, torch.device("cuda", 1),
                                                                    torch.device("cuda", 3)]
    assert devices.select_device(6, "auto") == torch.device("cuda", 2)
    assert four_gpus == [0, 1, 3, 2]  # each rank makes its GPU the current one


def test_a_mix_of_cpu_and_gpu_ranks_is_refused_naming_them():
    gpu, cpu = np.array([1.0, 5, 6, 7, 8]), np.zeros(5)
    rows = np.stack([gpu, gpu, cpu, gpu])
    with pytest.raises(UserError, match=r"ranks \[0, 1, 3\] on CUDA, ranks \[2\] on CPU.*run.device: cpu"):
        devices.placement_from_rows(rows, 0, CUDA0, "auto")


def test_ranks_sharing_a_gpu_are_counted_by_its_identity(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    a, b = np.array([1.0, 1, 2, 3, 4]), np.array([1.0, 9, 9, 9, 9])
    placement = devices.placement_from_rows(np.stack([a, b, a, a]), 2, CUDA0, "auto")
    assert (placement.ranks_on_my_gpu, placement.gpus, placement.ranks) == (3, 2, 4)
    assert placement.summary == "cuda (auto): 4 rank(s) on 2 GPUs (Test GPU)"
    cpu = devices.placement_from_rows(np.zeros((2, 5)), 1, torch.device("cpu"), "auto")
    assert cpu.summary == "cpu (run.device auto: no CUDA device)" and cpu.ranks_on_my_gpu == 0
    assert devices.placement_from_rows(np.zeros((1, 5)), 0, torch.device("cpu"), "cpu").summary == "cpu"


def test_memory_fraction_share_is_one_over_the_ranks_on_the_gpu():
    assert devices.memory_fraction(None, 4) is None
    assert devices.memory_fraction("share", 4) == 0.25 and devices.memory_fraction("share", 0) == 1.0
    assert devices.memory_fraction(0.3, 4) == 0.3
    with pytest.raises(ConfigError, match="gpu_memory_fraction"):
        config_from_tree({"run": {"gpu_memory_fraction": 0}})


def test_every_rank_refuses_a_mix_it_learns_from_the_all_gather():
    result = run_mpi(2, [sys.executable, str(REPO / "tests/mpi_scripts/devices_mix.py")], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    refused = sorted(line for line in result.stdout.splitlines() if line.startswith("REFUSED"))
    assert len(refused) == 2 and all("ranks [1] on CUDA, ranks [0] on CPU" in line for line in refused), refused
    agreed = run_mpi(2, [sys.executable, str(REPO / "tests/mpi_scripts/devices_mix.py"), "--all-gpu"], timeout=300)
    placed = sorted(line for line in agreed.stdout.splitlines() if line.startswith("PLACED"))
    assert len(placed) == 2 and all("2 rank(s) on 1 GPU (Fake GPU) sharing=2" in line for line in placed), agreed


# -------------------------------------------------------------------------- timing


def test_timed_waits_for_the_gpu_before_it_stops_the_clock(monkeypatch):
    synchronized = []

    def slow_synchronize(device=None):  # the GPU finishing queued work after the block returned
        synchronized.append(device)
        time.sleep(0.05)

    monkeypatch.setattr(torch.cuda, "synchronize", slow_synchronize)
    timings = {}
    with devices.timed(timings, "time_merge", CUDA0):
        pass
    assert synchronized == [CUDA0] and timings["time_merge"] >= 0.05
    with devices.timed(timings, "time_eval", torch.device("cpu")):
        pass
    assert synchronized == [CUDA0] and timings["time_eval"] < 0.05
    with pytest.raises(RuntimeError), devices.timed(timings, "time_train", CUDA0):
        raise RuntimeError
    assert "time_train" not in timings


# -------------------------------------------------------------- engines and memory


def test_a_cuda_rank_s_private_world_is_nccl():
    assert private_world_backend(CUDA0) == "cpu:gloo,cuda:nccl"
    assert private_world_backend(torch.device("cpu")) == private_world_backend(None) == "gloo"


def test_deepspeeds_comm_off_switches_do_not_cover_all_reduce(monkeypatch):
    """Why the private world is NCCL rather than DeepSpeed with its communication off (training.py)."""
    ds_torch = importlib.import_module("deepspeed.comm.torch")  # (the package attribute `torch` is torch itself)

    calls = []
    monkeypatch.setattr(torch.distributed, "broadcast", lambda **kwargs: calls.append("broadcast"))
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda **kwargs: calls.append("all_reduce"))
    backend = ds_torch.TorchBackend.__new__(ds_torch.TorchBackend)  # no process group needed for this
    backend._reduce_op = lambda op: op
    ds_torch.broadcast_comm_off(True)
    ds_torch.all_reduce_comm_off(True)
    try:
        backend.broadcast(torch.zeros(2), 0)
        backend.all_reduce(torch.zeros(2))
    finally:
        ds_torch.broadcast_comm_off(False)
        ds_torch.all_reduce_comm_off(False)
    assert calls == ["all_reduce"]  # the broadcast was skipped, the all-reduce was not


def _train(**values):
    return config_from_tree({"federation": {"num_clients": 2}, "train": values}).train


def test_zero_buckets_are_the_lora_size_and_bf16_accumulates_in_fp32():
    config = deepspeed_config(_train(zero_stage=1, precision="bf16"), CUDA0, trainable_elements=1001)
    assert config["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1002, "allgather_bucket_size": 1002}
    assert config["bf16"] == {"enabled": True} and config["data_types"] == {"grad_accum_dtype": "fp32"}
    stage0 = deepspeed_config(_train(), CUDA0, trainable_elements=1000)
    assert stage0["zero_optimization"] == {"stage": 0} and "data_types" not in stage0
    on_cpu = deepspeed_config(_train(zero_stage=2, precision="bf16"), torch.device("cpu"), 1000)
    assert on_cpu["bf16"] == {"enabled": False} and "data_types" not in on_cpu


def test_deepspeed_builds_an_fp32_accumulating_bf16_engine_from_that_config():
    """A real DeepSpeed engine (bf16 runs on DeepSpeed's CPU accelerator too), in a process of its own."""
    script = """
import torch, contextlib, io, deepspeed
from florist_mpi.config import config_from_tree
from florist_mpi.training import deepspeed_config, isolate_torch_distributed, prepare_deepspeed
isolate_torch_distributed(0); prepare_deepspeed()
train = config_from_tree({"train": {"zero_stage": 1, "precision": "bf16", "gradient_accumulation_steps": 4}}).train
model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 1))
config = deepspeed_config(train, torch.device("cuda", 0), trainable_elements=16 * 8 + 8 + 8 + 1)
with contextlib.redirect_stdout(io.StringIO()):
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
print("RESULT", type(engine.optimizer).__name__, engine.get_data_types()[1], engine.zero_reduce_bucket_size())
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=mpi_env(), capture_output=True, text=True,
                            timeout=600)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("RESULT")), result.stderr[-2000:])
    assert line == "RESULT BF16_Optimizer torch.float32 146", line  # 145 LoRA-sized elements, rounded up to even


def test_fresh_engines_are_torn_down_after_every_client(tmp_path):
    """Nothing of a fresh ZeRO-0 or ZeRO-1 engine (its optimizer, LoRA weights, hooks) outlives its client."""
    result = subprocess.run([sys.executable, str(REPO / "tests/scripts/engine_teardown.py")], cwd=REPO,
                            env=mpi_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    alive = {line.split()[1]: line.split()[2:] for line in result.stdout.splitlines() if line.startswith("ALIVE")}
    assert set(alive) == {"zero0", "zero1"}
    for stage, counts in alive.items():
        assert counts == ["0", "0", "0"], f"{stage}: engine, optimizer, LoRA weights alive after their client: {counts}"


def _oom_trainer(monkeypatch, on_out_of_memory: str) -> tuple[ClientTrainer, ClientJob]:
    from florist_mpi import training

    cfg = config_from_tree({"federation": {"num_clients": 4},
                            "train": {"client_engines": "fresh", "on_out_of_memory": on_out_of_memory}})

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1.2 GiB free.")

    monkeypatch.setattr(training, "_train_fresh", out_of_memory)
    job = ClientJob(client_id=3, round_index=2, rank=4, alpha=8.0, encoded=[])
    return ClientTrainer(None, {}, cfg, torch.device("cpu")), job


def test_a_client_out_of_gpu_memory_stops_the_run_by_default(monkeypatch):
    trainer, job = _oom_trainer(monkeypatch, "error")
    with pytest.raises(ClientOutOfMemory) as raised:
        trainer.train(job)
    message = UserError.one_line(raised.value)
    assert message.startswith("client 3 ran out of GPU memory in round 2 (CUDA out of memory. Tried to allocate")
    assert "train.on_out_of_memory: exclude" in message and isinstance(raised.value, UserError)


def test_exclude_leaves_a_client_out_of_gpu_memory_out_of_its_round(monkeypatch):
    trainer, job = _oom_trainer(monkeypatch, "exclude")
    with pytest.raises(ClientTrainingError, match=r"out of GPU memory \(CUDA out of memory"):
        trainer.train(job)


# ------------------------------------------------------------------------ refusals


def _cfg(**sections):
    return config_from_tree(sections)


def test_settings_that_contradict_the_device_or_deepspeed_are_refused(no_cuda):
    with pytest.raises(UserError, match="run.device cpu trains and stores the model in float32"):
        check_run_settings(_cfg(run={"device": "cpu"}, train={"precision": "bf16"}, model={"dtype": "bfloat16"}))
    with pytest.raises(UserError, match="run.device cpu"):
        check_run_settings(_cfg(run={"device": "cpu"}, model={"dtype": "bfloat16"}))
    with pytest.raises(UserError, match="bf16 at train.zero_stage 0 would sum 8 micro-batches"):
        check_run_settings(_cfg(train={"precision": "bf16", "gradient_accumulation_steps": 8},
                                model={"dtype": "bfloat16"}))
    check_run_settings(_cfg(train={"precision": "bf16", "gradient_accumulation_steps": 8, "zero_stage": 1},
                            model={"dtype": "bfloat16"}))  # the paper configs' setting
    check_run_settings(_cfg(train={"precision": "bf16"}, model={"dtype": "bfloat16"}))  # no accumulation
    with pytest.raises(UserError, match="run.device is cuda but this machine sees no CUDA device"):
        check_device(_cfg(run={"device": "cuda"}))
    check_device(_cfg(run={"device": "auto"}))


def test_sgd_with_zero_is_refused_by_validate_in_one_line():
    result = subprocess.run([*florist_cli(), "validate", "configs/demo.yaml", "--no-data", "--set",
                             "train.optimizer=sgd", "--set", "train.zero_stage=1"], cwd=REPO, env=mpi_env(),
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "train.optimizer sgd with train.zero_stage 1" in lines[0] and "train.optimizer: adamw" in lines[0]


def test_run_device_cuda_without_cuda_is_refused_in_one_line_and_writes_nothing(tmp_path):
    log = tmp_path / "refused.h5"
    env = dict(mpi_env(), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([*florist_cli(), "run", "configs/demo.yaml", "--set", "run.device=cuda", "--set",
                             f"run.output={log}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("florist-mpi: error: run.device is cuda but this machine sees no CUDA device")
    assert not log.exists() and not (tmp_path / "refused.h5.rounds").exists() and not list(tmp_path.iterdir())


def test_a_logged_config_names_the_device_keys_only_when_they_are_not_the_defaults():
    import yaml

    from florist_mpi.config import parse_config_text

    logged = yaml.safe_load(config_from_tree({}).to_yaml())
    assert "device" not in logged["run"] and "gpu_memory_fraction" not in logged["run"]
    assert "on_out_of_memory" not in logged["train"]  # logs of default runs read as before these keys existed
    chosen = config_from_tree({"run": {"device": "cuda", "gpu_memory_fraction": "share"},
                               "train": {"on_out_of_memory": "exclude"}})
    assert yaml.safe_load(chosen.to_yaml())["run"]["device"] == "cuda"
    assert parse_config_text(chosen.to_yaml()) == chosen


def test_the_deepspeed_floor_excludes_releases_that_cast_the_bases_buffers():
    import importlib.metadata
    import re

    from packaging.requirements import Requirement
    from packaging.version import Version

    deepspeed = Requirement(re.search(r'^\s*"(deepspeed[^"]*)"', (REPO / "pyproject.toml").read_text(), re.M).group(1))
    assert not deepspeed.specifier.contains("0.19.1") and deepspeed.specifier.contains("0.19.2")
    assert Version(importlib.metadata.version("deepspeed")) in deepspeed.specifier


def test_a_gpu_rank_loads_the_model_straight_onto_its_device():
    from florist_mpi.model import load_options

    cfg = config_from_tree({"model": {"dtype": "bfloat16"}, "train": {"precision": "bf16"}})
    assert load_options(cfg, torch.device("cuda", 1), local_only=True) == {
        "local_files_only": True, "trust_remote_code": False, "dtype": torch.bfloat16, "device_map": {"": 1}}
    on_cpu = load_options(cfg, torch.device("cpu"), local_only=False)
    assert on_cpu["dtype"] == torch.float32 and "device_map" not in on_cpu  # CPU: float32, loaded in place


@pytest.mark.parametrize("device, accelerator", [(torch.device("cpu"), "cpu"), (CUDA0, "cuda")])
def test_deepspeeds_accelerator_follows_the_ranks_device(monkeypatch, device, accelerator):
    """run.device: cpu on a GPU machine must give CPU engines (DeepSpeed's CUDA accelerator would move the model)."""
    from florist_mpi import training

    monkeypatch.setenv("DS_ACCELERATOR", "cuda" if accelerator == "cpu" else "cpu")  # the opposite, restored after
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # no process group in the test process
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "x")
    training.isolate_torch_distributed(0, device)
    assert os.environ["DS_ACCELERATOR"] == accelerator
