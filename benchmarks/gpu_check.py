"""The GPU check: the project's CUDA paths on one GPU machine, unattended, in a fixed time budget.

Every check runs in a child process of its own (a CUDA error, an out-of-memory or a hang in
one cannot take the others down), under a time limit that is the smaller of its own limit and
what is left of --budget. Checks run in the order listed (most informative first), so a short
budget skips the last ones. One line per check:

    CHECK <id> PASS|FAIL|SKIP <figures>

then `SUMMARY <json>` (also written to --json). The exit status is 1 when a check FAILed, else 0
(SKIPs, e.g. of GPU checks on a machine without CUDA, are not failures); 2 for bad arguments.

    python benchmarks/gpu_check.py                        # every check, 480 s budget
    python benchmarks/gpu_check.py --dry-run              # list the checks and what each asserts
    python benchmarks/gpu_check.py --only env,leak --budget 120 --json out/summary.json --log out/checks.log

How to prepare a machine without network and run it: docs/gpu.md. On a machine without CUDA the
CPU-capable checks (env, refusals) run and the GPU checks SKIP; CI runs those (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_BUDGET_S = 480
MIN_START_S = 10  # a check is not started with less than this left of the budget


@dataclass
class Result:
    status: str  # PASS | FAIL | SKIP
    figures: dict = field(default_factory=dict)
    note: str = ""

    def line(self, check_id: str) -> str:
        figures = " ".join(f"{k}={_short(v)}" for k, v in self.figures.items())
        note = f" -- {self.note}" if self.note else ""
        return f"CHECK {check_id} {self.status} {figures}{note}".rstrip()


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace(" ", "_")


@dataclass(frozen=True)
class Check:
    id: str
    asserts: str  # what PASS means
    needs_gpu: bool
    limit_s: int
    ranks: int  # MPI ranks it launches (> 1 needs mpiexec)
    run: Callable[[Context], Result]


@dataclass
class Context:
    """What a check's child process gets: where to work, and how to start runs."""

    work: Path
    python: str = sys.executable

    def env(self, **extra) -> dict:
        env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
                   PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1", FLORIST_MPI_CACHE=str(self.work / "cache"))
        # Open MPI inside containers: loopback TCP and shared memory without cross-memory attach
        env.setdefault("OMPI_MCA_btl", "self,vader,tcp")
        env.setdefault("OMPI_MCA_btl_tcp_if_include", "lo")
        env.setdefault("OMPI_MCA_oob_tcp_if_include", "lo")
        env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        env.setdefault("OMPI_MCA_btl_sm_single_copy_mechanism", "none")
        env.update(extra)
        return env

    def florist(self, ranks: int, *args: str, env: dict | None = None, timeout: float = 300):
        """`florist-mpi ARGS` on `ranks` MPI ranks (captured)."""
        from launch import mpiexec

        command = [*mpiexec(ranks), self.python, "-m", "florist_mpi.cli", *args]
        return subprocess.run(command, cwd=REPO, env=env or self.env(), capture_output=True, text=True,
                              timeout=timeout)


def mpiexec_path() -> str | None:
    from launch import mpiexec

    launcher = mpiexec(2)
    return launcher[0] if launcher else None


def _settings(**values) -> list[str]:
    return [item for key, value in values.items() for item in ("--set", f"{key.replace('__', '.')}={value}")]


# ---------------------------------------------------------------------------- checks


def check_env(ctx: Context) -> Result:
    """Versions of everything the GPU paths use; the DeepSpeed floor."""
    import deepspeed
    import torch
    from packaging.version import Version

    import florist_mpi
    from florist_mpi.roundlog import library_versions

    figures = {**library_versions(), "python": sys.version.split()[0], "cuda": torch.version.cuda,
               "cuda_available": torch.cuda.is_available(), "mpiexec": mpiexec_path()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        figures.update(gpus=torch.cuda.device_count(), gpu=props.name, gpu_gib=round(props.total_memory / 2**30, 1),
                       nccl=".".join(map(str, torch.cuda.nccl.version())),
                       nccl_available=torch.distributed.is_nccl_available())
    figures["mpi"] = figures["mpi"].split(",")[0].strip("\x00 ")
    figures["florist_mpi_path"] = str(Path(florist_mpi.__file__).parent)
    if Version(deepspeed.__version__.split("+")[0]) < Version("0.19.2"):
        return Result("FAIL", figures, f"deepspeed {deepspeed.__version__} < 0.19.2 (bf16 casts the base's buffers)")
    if torch.cuda.is_available() and not torch.distributed.is_nccl_available():
        return Result("FAIL", figures, "torch has no NCCL: the private world of a CUDA rank needs it")
    note = "" if torch.cuda.is_available() else "no CUDA device: the GPU checks will SKIP"
    return Result("PASS", figures, note)


def check_refusals(ctx: Context) -> Result:
    """One-line refusals, exit 2, nothing written: run.device cuda with CUDA hidden; sgd with ZeRO-1."""
    output = ctx.work / "refused.h5"
    hidden = ctx.env(CUDA_VISIBLE_DEVICES="")
    cuda = ctx.florist(1, "run", "configs/demo.yaml", *_settings(run__device="cuda", run__output=output), env=hidden)
    sgd = ctx.florist(1, "validate", "configs/demo.yaml", *_settings(train__optimizer="sgd", train__zero_stage=1))
    cpu_bf16 = ctx.florist(1, "validate", "configs/demo.yaml",
                           *_settings(run__device="cpu", train__precision="bf16", model__dtype="bfloat16"))
    problems = []
    for name, result, words in (("cuda", cuda, "run.device"), ("sgd", sgd, "train.optimizer sgd"),
                                ("cpu_bf16", cpu_bf16, "run.device cpu")):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        if result.returncode != 2 or len(lines) != 1 or words not in lines[0]:
            problems.append(f"{name}: exit {result.returncode}, stderr {lines[-3:]}")
    if output.exists() or Path(f"{output}.rounds").exists():
        problems.append("the refused run wrote a log")
    figures = {"cuda_exit": cuda.returncode, "sgd_exit": sgd.returncode, "cpu_bf16_exit": cpu_bf16.returncode}
    return Result("FAIL" if problems else "PASS", figures, "; ".join(problems))


def check_devices4(ctx: Context) -> Result:
    """4 ranks on one GPU: all on cuda:0, counted as sharing it, NCCL private worlds, the `share` memory cap."""
    from launch import mpiexec

    if not mpiexec(4):
        return Result("SKIP", note="no mpiexec")
    out = ctx.work / "devices4"
    out.mkdir(parents=True, exist_ok=True)
    command = [*mpiexec(4), ctx.python, str(Path(__file__).resolve()), "--mpi-probe", str(out)]
    first_gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    result = subprocess.run(command, cwd=REPO, env=ctx.env(CUDA_VISIBLE_DEVICES=first_gpu), capture_output=True,
                            text=True, timeout=240)
    if result.returncode != 0:
        return Result("FAIL", {"exit": result.returncode}, result.stderr.strip().splitlines()[-1:][0][:300]
                      if result.stderr.strip() else "mpiexec failed")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    figures = {"devices": ",".join(sorted({r["device"] for r in ranks})), "sharing": ranks[0]["sharing"],
               "gpus": ranks[0]["gpus"], "backend": ranks[0]["backend"], "cap_refused_30pct": ranks[0]["cap_refused"],
               "summary": ranks[0]["summary"]}
    problems = [f"rank {i}: {r['problems']}" for i, r in enumerate(ranks) if r["problems"]]
    return Result("FAIL" if problems else "PASS", figures, "; ".join(problems))


def mpi_probe(out: Path) -> None:
    """One rank of check_devices4 (run under mpiexec): writes out/rank<r>.json."""
    import torch
    import torch.distributed as dist

    from florist_mpi import comm
    from florist_mpi.config import config_from_tree
    from florist_mpi.devices import place_rank
    from florist_mpi.training import isolate_torch_distributed

    world = comm.init_world()
    cfg = config_from_tree({"run": {"device": "cuda", "gpu_memory_fraction": "share"}})
    placement = place_rank(world, cfg)
    device = placement.device
    isolate_torch_distributed(world.local_rank, device)
    value = torch.full((1024,), float(world.rank), device=device)
    dist.broadcast(value, 0)
    dist.all_reduce(value)  # a world of one: each rank keeps its own value
    problems = []
    if device != torch.device("cuda", 0):
        problems.append(f"device {device}")
    if placement.ranks_on_my_gpu != world.size or placement.gpus != 1:
        problems.append(f"counted {placement.ranks_on_my_gpu} ranks on {placement.gpus} GPUs")
    if float(value[0]) != float(world.rank):
        problems.append("the private world is not private")
    backend = str(dist.get_backend())
    if "nccl" not in backend:
        problems.append(f"backend {backend}")
    world.barrier()
    cap_refused = None
    if world.rank == 0:  # the share is 1/4: 30% of the GPU must be refused by the cap, not by the hardware
        total = torch.cuda.get_device_properties(device).total_memory
        try:
            block = torch.empty(int(0.30 * total), dtype=torch.uint8, device=device)
            del block
            cap_refused = False
            problems.append("a 30% allocation passed the 25% cap")
        except torch.cuda.OutOfMemoryError:
            cap_refused = True
    world.barrier()
    record = {"device": str(device), "sharing": placement.ranks_on_my_gpu, "gpus": placement.gpus,
              "backend": backend, "cap_refused": cap_refused, "summary": placement.summary, "problems": problems}
    (out / f"rank{world.rank}.json").write_text(json.dumps(record))


def _demo(ctx: Context, label: str, **settings) -> Result:
    """The demo on 2 GPU ranks for 3 rounds: exit 0, 3 rounds logged, the eval loss falls by ≥ 0.5 nats."""
    import h5py
    from launch import mpiexec

    if not mpiexec(2):
        return Result("SKIP", note="no mpiexec")
    output = ctx.work / f"demo_{label}.h5"
    start = time.perf_counter()
    result = ctx.florist(2, "run", "configs/demo.yaml", "--overwrite",
                         *_settings(run__device="cuda", run__rounds=3, run__output=output, **settings))
    wall = time.perf_counter() - start
    if result.returncode != 0:
        return Result("FAIL", {"exit": result.returncode, "wall_s": wall}, _last_line(result.stderr))
    with h5py.File(output, "r") as handle:
        rounds = sorted(handle["rounds"])
        initial = float(handle.attrs["initial_eval_loss"])
        final = float(handle["rounds"][rounds[-1]].attrs["eval_loss"])
        train_s = [round(float(handle["rounds"][r].attrs["time_train"]), 3) for r in rounds]
    figures = {"rounds": len(rounds), "initial_eval": initial, "final_eval": final, "wall_s": wall,
               "time_train_s": ",".join(map(str, train_s)), "banner_cuda": "device cuda" in result.stdout}
    problems = []
    if len(rounds) != 3:
        problems.append(f"{len(rounds)} rounds logged")
    if not final <= initial - 0.5:
        problems.append(f"eval loss {initial:.3f} -> {final:.3f}: learned < 0.5 nats")
    if "device cuda" not in result.stdout:
        problems.append("the banner does not say cuda")
    return Result("FAIL" if problems else "PASS", figures, "; ".join(problems))


def check_demo_fp32(ctx: Context) -> Result:
    return _demo(ctx, "fp32")


def check_demo_bf16(ctx: Context) -> Result:
    return _demo(ctx, "bf16", train__precision="bf16", model__dtype="bfloat16", train__zero_stage=1,
                 train__gradient_accumulation_steps=2)


def check_cpu_device(ctx: Context) -> Result:
    """run.device: cpu on a GPU machine: the demo trains on CPU (1 round, 1 rank), exit 0, banner says cpu."""
    output = ctx.work / "demo_cpu.h5"
    start = time.perf_counter()
    result = ctx.florist(1, "run", "configs/demo.yaml", "--overwrite",
                         *_settings(run__device="cpu", run__rounds=1, run__output=output))
    figures = {"exit": result.returncode, "wall_s": time.perf_counter() - start}
    problems = []
    if result.returncode != 0:
        problems.append(_last_line(result.stderr))
    elif "device cpu |" not in result.stdout or not output.exists():
        problems.append("the banner does not say cpu, or no log")
    return Result("FAIL" if problems else "PASS", figures, "; ".join(problems))


def _random_llama(hidden: int, intermediate: int, layers: int, heads: int, device):
    """A random Llama built straight on `device` in bfloat16 (no copy of it in host memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # parameters are created, and initialised, in bf16 on the device
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _client_setup(model, device, **train):
    """(config, module shapes, a job factory) for fresh ZeRO-1 bf16 clients on `model`, q/v rank-16 LoRA."""
    import numpy as np

    from florist_mpi.config import config_from_tree
    from florist_mpi.model import adapted_modules
    from florist_mpi.training import ClientJob, isolate_torch_distributed, prepare_deepspeed

    cfg = config_from_tree({
        "run": {"device": "cuda"}, "federation": {"num_clients": 8},
        "model": {"dtype": "bfloat16"}, "lora": {"rank": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]},
        "train": {"zero_stage": 1, "precision": "bf16", "micro_batch_size": 4, "local_steps": 2, **train},
    })
    isolate_torch_distributed(0, device)
    prepare_deepspeed()
    shapes = {name: tuple(m.weight.shape) for name, m in adapted_modules(model, ["q_proj", "v_proj"]).items()}
    rng = np.random.default_rng(0)

    def job(client_id: int, length: int):
        encoded = [(ids, ids) for ids in (rng.integers(3, 32000, size=length).tolist() for _ in range(16))]
        return ClientJob(client_id=client_id, round_index=0, rank=16, alpha=32.0, encoded=encoded)

    return cfg, shapes, job


def _host_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def check_leak(ctx: Context) -> Result:
    """5 fresh ZeRO-1 bf16 clients of a ~0.5B random Llama: GPU memory flat, host memory flat, NCCL world."""
    import torch
    import torch.distributed as dist

    from florist_mpi.training import train_client

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    model = _random_llama(1536, 4096, 14, 12, device)
    params = sum(p.numel() for p in model.parameters())
    cfg, shapes, job = _client_setup(model, device, gradient_accumulation_steps=2)
    allocated, reserved, host, seconds = [], [], [], []
    for client in range(5):
        start = time.perf_counter()
        train_client(model, set(shapes), job(client, 128), cfg, device)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        allocated.append(torch.cuda.memory_allocated(device) / 2**20)
        reserved.append(torch.cuda.memory_reserved(device) / 2**20)
        host.append(_host_rss_mb())
    growth = allocated[-1] - allocated[0]
    figures = {"params_b": params / 1e9, "allocated_mb": ",".join(f"{a:.0f}" for a in allocated),
               "growth_mb": growth, "reserved_last_mb": reserved[-1], "host_growth_mb": host[-1] - host[0],
               "client_s": ",".join(f"{s:.2f}" for s in seconds), "backend": str(dist.get_backend())}
    problems = []
    if growth > 16:
        problems.append(f"GPU memory grew {growth:.0f} MB over 4 clients")
    if host[-1] - host[0] > 256:
        problems.append(f"host memory grew {host[-1] - host[0]:.0f} MB over 4 clients")
    if "nccl" not in str(dist.get_backend()):
        problems.append(f"private world backend {dist.get_backend()}")
    return Result("FAIL" if problems else "PASS", figures, "; ".join(problems))


def check_llama7b(ctx: Context) -> Result:
    """One Llama-7B-shaped client (built on the GPU, no host copy; q/v rank 16, ZeRO-1 bf16, 4x512 tokens): peak memory,
    ranks that fit per GPU, engine set-up time; a rank-32 merge into 64 modules timed with and without sync."""
    import numpy as np
    import torch

    from florist_mpi import training
    from florist_mpi.devices import synchronize
    from florist_mpi.model import adapted_modules, float32_masters, merge_update
    from florist_mpi.training import train_client

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    host_start = _host_rss_mb()
    start = time.perf_counter()
    model = _random_llama(4096, 11008, 32, 32, device)
    build_s = time.perf_counter() - start
    host_build = _host_rss_mb() - host_start
    model_gb = torch.cuda.memory_allocated(device) / 1e9
    cfg, shapes, job = _client_setup(model, device, gradient_accumulation_steps=1, micro_batch_size=4)
    engine_s, build_engine = [], training.build_engine

    def timed_engine(*args):  # engine set-up: DeepSpeed broadcasts all 6.7B weights in the private world
        begin = time.perf_counter()
        engine = build_engine(*args)
        torch.cuda.synchronize()
        engine_s.append(time.perf_counter() - begin)
        return engine

    training.build_engine = timed_engine
    torch.cuda.reset_peak_memory_stats(device)
    host_before = _host_rss_mb()
    start = time.perf_counter()
    update = train_client(model, set(shapes), job(0, 512), cfg, device)
    client_s = time.perf_counter() - start
    host_growth = _host_rss_mb() - host_before
    peak_gb = torch.cuda.max_memory_allocated(device) / 1e9
    total_gb = torch.cuda.get_device_properties(device).total_memory / 1e9
    modules = adapted_modules(model, ["q_proj", "v_proj"])
    masters = float32_masters(modules)  # the fp32 copies every bf16 rank keeps (4 bytes per adapted weight)
    rng = np.random.default_rng(1)
    factors = {name: ((rng.standard_normal((m, 32)) * 1e-3).astype(np.float32),
                      rng.standard_normal((32, n)).astype(np.float32)) for name, (m, n) in shapes.items()}
    merge_update(modules, factors, masters)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    merge_update(modules, factors, masters)
    unsynced = time.perf_counter() - start
    synchronize(device)
    synced = time.perf_counter() - start
    per_rank_gb = peak_gb + sum(m.numel() * 4 for m in masters.values()) / 1e9 + 0.6  # + masters + CUDA context
    figures = {"build_s": build_s, "model_gb": model_gb, "engine_s": engine_s[0], "client_s": client_s,
               "host_build_mb": host_build, "host_client_mb": host_growth, "peak_gb": peak_gb,
               "per_rank_gb": per_rank_gb, "ranks_per_gpu": int(total_gb * 0.95 // per_rank_gb),
               "merge_unsynced_s": unsynced, "merge_synced_s": synced,
               "loss": update.train_loss}
    problems = [] if np.isfinite(update.train_loss) else ["non-finite training loss"]
    for what, grown in (("building the model", host_build), ("training the client", host_growth)):
        if grown > 0.25 * model_gb * 1000:  # the model (or a staging copy of it) went through host memory
            problems.append(f"host memory grew {grown:.0f} MB {what}")
    return Result("FAIL" if problems else "PASS", figures, "; ".join(problems))


def check_aggregation(ctx: Context) -> Result:
    """FLoRIST at Llama-7B shapes (64 modules 4096x4096, ranks 64..4, tau 0.9) on GPU and CPU: the same ranks,
    products B@A within 1e-5 (relative Frobenius), times."""
    import torch

    from florist_mpi.aggregation import aggregate_adapter

    device = torch.device("cuda", 0)
    generator = torch.Generator().manual_seed(0)
    ranks, weights = [64, 32, 16, 16, 8, 8, 4, 4], [120, 80, 60, 60, 40, 40, 20, 20]
    adapter = {f"m{i}": [(torch.randn(4096, r, generator=generator) * 0.01, torch.randn(r, 4096, generator=generator))
                         for r in ranks] for i in range(64)}
    start = time.perf_counter()
    on_cpu = aggregate_adapter("florist", adapter, weights, tau=0.9)
    cpu_s = time.perf_counter() - start
    on_gpu_input = {name: [(B.to(device), A.to(device)) for B, A in pairs] for name, pairs in adapter.items()}
    gpu_times = []
    for _ in range(2):  # the first call also initialises cuSOLVER
        torch.cuda.synchronize()
        start = time.perf_counter()
        on_gpu = aggregate_adapter("florist", on_gpu_input, weights, tau=0.9)
        torch.cuda.synchronize()
        gpu_times.append(time.perf_counter() - start)
    worst, rank_mismatch = 0.0, []
    for name, cpu_result in on_cpu.items():
        gpu_result = on_gpu[name]
        if gpu_result.rank != cpu_result.rank:
            rank_mismatch.append(f"{name}: {gpu_result.rank} vs {cpu_result.rank}")
            continue
        reference = (cpu_result.B.double() @ cpu_result.A.double()).to(device)
        product = gpu_result.B.double() @ gpu_result.A.double()
        worst = max(worst, float(torch.linalg.norm(product - reference) / torch.linalg.norm(reference)))
    figures = {"cpu_s": cpu_s, "gpu_first_s": gpu_times[0], "gpu_s": gpu_times[1], "speedup": cpu_s / gpu_times[1],
               "max_rel_diff": worst, "mean_rank": sum(r.rank for r in on_cpu.values()) / len(on_cpu)}
    problems = rank_mismatch[:3] + ([f"products differ by {worst:.2e}"] if worst > 1e-5 else [])
    return Result("FAIL" if problems else "PASS", figures, "; ".join(problems))


def check_reuse(ctx: Context) -> Result:
    """Reused vs fresh client engines on GPU (tests/scripts/client_engines.py), fp32 base and bf16 base:
    every factor within 1e-6, the base untouched between clients; times per client."""
    import numpy as np

    figures, problems = {}, []
    for variant in ("plain", "bf16base"):
        out = ctx.work / f"engines_{variant}.npz"
        result = subprocess.run([ctx.python, "tests/scripts/client_engines.py", str(out), variant, "cuda"], cwd=REPO,
                                env=ctx.env(CUBLAS_WORKSPACE_CONFIG=":4096:8"), capture_output=True, text=True,
                                timeout=240)
        if result.returncode != 0:
            problems.append(f"{variant}: {_last_line(result.stderr)}")
            continue
        saved = np.load(out)
        keys = [k.removeprefix("reused/") for k in saved.files if k.startswith("reused/")]
        diff = max(float(np.max(np.abs(saved["reused/" + k] - saved["fresh/" + k]))) for k in keys)
        exact = sum(np.array_equal(saved["reused/" + k], saved["fresh/" + k]) for k in keys)
        figures[f"{variant}_max_diff"] = diff
        figures[f"{variant}_bitwise"] = f"{exact}/{len(keys)}"
        figures[f"{variant}_fresh_over_reuse"] = float(saved["seconds/fresh"] / saved["seconds/reused"])
        if diff > 1e-6:
            problems.append(f"{variant}: reused and fresh differ by {diff:.2e}")
        if not np.array_equal(saved["logits/before"], saved["logits/after"]):
            problems.append(f"{variant}: the base changed between clients")
    return Result("FAIL" if problems else "PASS", figures, "; ".join(problems))


def check_sharded(ctx: Context) -> Result:
    """The demo on 4 GPU ranks, 2 rounds, root vs sharded aggregation: the same global factors (within 1e-6)."""
    import h5py
    import numpy as np
    from launch import mpiexec

    if not mpiexec(4):
        return Result("SKIP", note="no mpiexec")
    logs, walls = {}, {}
    for mode in ("root", "sharded"):
        logs[mode] = ctx.work / f"sharded_{mode}.h5"
        start = time.perf_counter()
        result = ctx.florist(4, "run", "configs/demo.yaml", "--overwrite",
                             *_settings(run__device="cuda", run__rounds=2, run__output=logs[mode],
                                        federation__aggregation=mode, eval__every=0))
        walls[mode] = time.perf_counter() - start
        if result.returncode != 0:
            return Result("FAIL", {"mode": mode, "exit": result.returncode}, _last_line(result.stderr))
    worst, exact, total = 0.0, 0, 0
    with h5py.File(logs["root"], "r") as root, h5py.File(logs["sharded"], "r") as sharded:
        for key in sorted(root["rounds"]):
            for module, node in root["rounds"][key]["global"].items():
                for part in ("B", "A"):
                    a, b = node[part][()], sharded["rounds"][key]["global"][module][part][()]
                    total += 1
                    if a.shape != b.shape:
                        return Result("FAIL", {}, f"round {key} {module}: ranks differ")
                    exact += int(np.array_equal(a, b))
                    worst = max(worst, float(np.max(np.abs(a - b))) if a.size else 0.0)
    figures = {"root_wall_s": walls["root"], "sharded_wall_s": walls["sharded"], "max_diff": worst,
               "bitwise": f"{exact}/{total}"}
    return Result("FAIL" if worst > 1e-6 else "PASS", figures, f"factors differ by {worst:.2e}" if worst > 1e-6 else "")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


CHECKS = [
    Check("env", "torch, CUDA, NCCL, DeepSpeed >= 0.19.2 and the other libraries import; versions recorded",
          False, 60, 1, check_env),
    Check("refusals", "with CUDA_VISIBLE_DEVICES= `run.device: cuda` is refused in one line, exit 2, no log; "
          "`validate` refuses sgd with ZeRO-1 and bf16 on `run.device: cpu` in one line each", False, 90, 1,
          check_refusals),
    Check("devices4", "4 ranks on one visible GPU: every rank on cuda:0, 4 ranks counted on 1 GPU, NCCL private "
          "worlds that stay private, `gpu_memory_fraction: share` refuses 30% of the GPU on a rank", True, 120, 4,
          check_devices4),
    Check("leak", "5 fresh ZeRO-1 bf16 clients of a ~0.5B random Llama: GPU memory allocated after the 5th within "
          "16 MB of after the 1st, host memory within 256 MB, private world on NCCL", True, 150, 1, check_leak),
    Check("llama7b", "one Llama-7B-shaped client step (model built on the GPU, no host copy; q/v rank 16, ZeRO-1 bf16, "
          "4x512 tokens) finishes with a finite loss; host memory grows < 1/4 of the model in the build and in the "
          "client; records engine set-up "
          "time, peak memory, ranks per GPU, merge time with and without synchronisation", True, 180, 1,
          check_llama7b),
    Check("demo_fp32", "the demo on 2 GPU ranks in fp32, 3 rounds: exit 0, 3 rounds logged, eval loss falls >= 0.5 "
          "nats, banner says cuda", True, 150, 2, check_demo_fp32),
    Check("demo_bf16", "the same in bf16 (model.dtype bfloat16, ZeRO-1, 2 accumulation steps)", True, 150, 2,
          check_demo_bf16),
    Check("cpu_device", "`run.device: cpu` on the GPU machine: the demo trains on CPU (1 round), exit 0, banner "
          "says cpu", True, 120, 1, check_cpu_device),
    Check("aggregation", "FLoRIST at Llama-7B shapes on GPU vs CPU: the same ranks, products within 1e-5, times",
          True, 120, 1, check_aggregation),
    Check("reuse", "reused vs fresh client engines on GPU (fp32 and bf16 base): factors within 1e-6, the base "
          "untouched between clients", True, 150, 1, check_reuse),
    Check("sharded", "the demo on 4 GPU ranks, 2 rounds: sharded and root aggregation log the same global factors "
          "(within 1e-6)", True, 180, 4, check_sharded),
]


# ------------------------------------------------------------------------- the runner


def run_child(check_id: str, result_path: Path, work: Path) -> int:
    """Run one check in this process and write its Result as JSON (a raised error is a FAIL)."""
    check = next(c for c in CHECKS if c.id == check_id)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        result = check.run(Context(work=work))
    except Exception as err:  # noqa: BLE001 - any error of a check is that check's FAIL
        traceback.print_exc()
        result = Result("FAIL", note=f"{err.__class__.__name__}: {str(err).strip()[:300]}")
    result_path.write_text(json.dumps(asdict(result), default=str))
    return 0


def cuda_present(python: str) -> bool:
    """Whether a fresh process sees a CUDA device (asked in a child: this process keeps no CUDA context)."""
    probe = "import torch; print(int(torch.cuda.is_available() and torch.cuda.device_count() > 0))"
    try:
        result = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False
    return result.stdout.strip().endswith("1")


def run_isolated(check: Check, script: Path, work: Path, timeout: float, log) -> tuple[Result | None, bool]:
    """(the child's Result or None, whether it was killed at `timeout`)."""
    result_path = work / f"{check.id}.result.json"
    result_path.unlink(missing_ok=True)
    command = [sys.executable, str(script), "--child", check.id, "--result", str(result_path), "--work", str(work)]
    log.write(f"\n===== {check.id} ({time.strftime('%H:%M:%S')}) =====\n")
    log.flush()
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env=Context(work=work).env())
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the child and whatever it started (mpiexec, ranks)
        process.wait()
        return None, True
    if not result_path.exists():
        return Result("FAIL", note=f"the check's process ended with exit {process.returncode} and no result "
                      "(see the log)"), False
    return Result(**json.loads(result_path.read_text())), False


def run_checks(selected: list[Check], budget: float, script: Path, work: Path, log_path: Path) -> dict:
    start = time.perf_counter()
    gpu = cuda_present(sys.executable) if any(c.needs_gpu for c in selected) else False
    results = {}
    with open(log_path, "a") as log:
        for check in selected:
            left = budget - (time.perf_counter() - start)
            began = time.perf_counter()
            if check.needs_gpu and not gpu:
                result = Result("SKIP", note="no CUDA device")
            elif left < MIN_START_S:
                result = Result("SKIP", note=f"budget: {max(left, 0):.0f} s left")
            else:
                timeout = min(check.limit_s, left)
                result, killed = run_isolated(check, script, work, timeout, log)
                if killed:
                    by_budget = timeout < check.limit_s
                    result = Result("SKIP" if by_budget else "FAIL", {},
                                    f"{'budget ran out' if by_budget else 'timed out'} after {timeout:.0f} s")
            result.figures.setdefault("seconds", round(time.perf_counter() - began, 1))
            results[check.id] = result
            print(result.line(check.id), flush=True)
    return {
        "budget_s": budget, "elapsed_s": round(time.perf_counter() - start, 1), "cuda": gpu,
        "passed": sum(r.status == "PASS" for r in results.values()),
        "failed": sum(r.status == "FAIL" for r in results.values()),
        "skipped": sum(r.status == "SKIP" for r in results.values()),
        "checks": {check_id: asdict(result) for check_id, result in results.items()},
    }


def describe(checks: list[Check], budget: float) -> str:
    lines = [f"gpu_check: {len(checks)} checks, budget {budget:.0f} s (dry run: nothing is run)"]
    for check in checks:
        needs = ("GPU" if check.needs_gpu else "CPU or GPU") + (f", {check.ranks} MPI ranks" if check.ranks > 1 else "")
        lines.append(f"  {check.id:<12} [{needs}; at most {check.limit_s} s] asserts: {check.asserts}")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated check ids (default: all, in order)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all checks together")
    parser.add_argument("--dry-run", action="store_true", help="list the checks and what each asserts; run nothing")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--log", type=Path, help="the checks' own output (default: WORK/gpu_check.log)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mpi-probe", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, script: Path | None = None) -> int:
    args = parse_args(argv)
    if args.mpi_probe:
        mpi_probe(args.mpi_probe)
        return 0
    if args.child:
        return run_child(args.child, args.result, args.work)
    known = {c.id: c for c in CHECKS}
    wanted = [part.strip() for part in args.only.split(",") if part.strip()] if args.only else list(known)
    unknown = [name for name in wanted if name not in known]
    if unknown:
        print(f"gpu_check: unknown check(s) {unknown}: choose from {', '.join(known)}", file=sys.stderr)
        return 2
    selected = [c for c in CHECKS if c.id in wanted]
    if args.dry_run:
        print(describe(selected, args.budget))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    log_path = args.log or work / "gpu_check.log"
    summary = run_checks(selected, args.budget, script or Path(__file__).resolve(), work, log_path)
    summary["log"] = str(log_path)
    text = json.dumps(summary, default=str)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    print(f"SUMMARY {text}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(BENCHMARKS))
    sys.exit(main())
