"""The job scripts in jobs/ on a live Slurm: each is submitted with `sbatch --wait` on CPUs
(2 tasks, 2 rounds of the demo), and its exit state, output file and HDF5 log are checked;
a launch whose MPI plugin cannot join the tasks into one world is refused.

Needs Slurm's commands and a controller that answers: `.ci/slurm.sh start` sets up a
one-node Slurm on this machine (CI does so before the tests). Skipped otherwise.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import pandas as pd
import pytest
from conftest import REPO

from florist_mpi.storage import completed_rounds

pytestmark = pytest.mark.slurm

JOBS = REPO / "jobs"
ROUNDS = 2
TASKS = 2
# The demo, cut to what shows that the job ran federated rounds on TASKS ranks.
FAST = ["--set", f"run.rounds={ROUNDS}", "--set", "train.local_steps=2"]
CPUS = [f"--ntasks-per-node={TASKS}", "--cpus-per-task=1"]  # a CPU node: no GPU asked for
JOB_TIMEOUT_S = 900  # a job stuck in an MPI collective is cancelled after this


def slurm_missing() -> str | None:
    """Why Slurm cannot be used here, or None when its controller answers and a node is up."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return "no sbatch/scontrol on PATH: start a one-node Slurm with `.ci/slurm.sh start` (as root)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
        nodes = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "the Slurm controller does not answer (scontrol ping timed out): `.ci/slurm.sh start`"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        said = " ".join((ping.stdout + ping.stderr).split())[:160]
        return f"the Slurm controller does not answer (scontrol ping: {said}): `.ci/slurm.sh start`"
    if not set(nodes.stdout.split()) & {"idle", "mix", "alloc", "comp"}:
        return f"no Slurm node is up (sinfo: {nodes.stdout.strip() or nodes.stderr.strip()})"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    reason = slurm_missing()
    if reason and os.environ.get("FLORIST_REQUIRE_SLURM") == "1":
        pytest.fail(f"FLORIST_REQUIRE_SLURM=1 but {reason}")  # CI: the job scripts must really run
    if reason:
        pytest.skip(reason)


def job_env(**extra: str) -> dict:
    """This interpreter's environment for the jobs (sbatch exports it): its venv, this checkout."""
    env = dict(os.environ)
    env["VENV"] = str(Path(sys.executable).parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS="1", PMIX_MCA_psec="native", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    for name in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
        del env[name]  # tests run inside a Slurm job must not hand that job's settings on
    env.update(extra)
    return env


@dataclass
class Job:
    job_id: str
    returncode: int  # sbatch --wait: the job's exit code (the highest of an array's tasks)
    states: list[tuple[str, str]]  # (JobState, ExitCode) of the job or of each array task
    output: str


def submit(script: str, sbatch_flags: list[str], args: list[str], out: Path, env: dict) -> Job:
    """sbatch --wait a job script from the repository root; its record afterwards."""
    command = ["sbatch", "--wait", "--parsable", "--time=00:15:00", f"--output={out}", *sbatch_flags,
               str(JOBS / script), *args]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = process.stdout.readline().strip().split(";")[0]
    try:
        stdout, stderr = process.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", job_id], capture_output=True)
        process.kill()
        pytest.fail(f"job {job_id} ({script}) did not end within {JOB_TIMEOUT_S}s")
    assert job_id.isdigit(), f"sbatch did not submit {script}: {stderr}"
    return job_record(job_id, process.returncode, out)


def submit_now(script: str, sbatch_flags: list[str], args: list[str], out: Path, env: dict) -> str:
    """sbatch a job script from the repository root without waiting; its job id."""
    command = ["sbatch", "--parsable", "--time=00:15:00", f"--output={out}", *sbatch_flags, str(JOBS / script), *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    job_id = result.stdout.strip().split(";")[0]
    assert result.returncode == 0 and job_id.isdigit(), f"sbatch did not submit {script}: {result.stderr}"
    return job_id


def job_record(job_id: str, returncode: int, out: Path) -> Job:
    """The job's (or every array task's) state and exit code, and its output files read together."""
    shown = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], capture_output=True, text=True)
    states = re.findall(r"JobState=(\S+).*?ExitCode=(\S+)", shown.stdout)
    output = "\n".join(p.read_text(errors="replace") for p in sorted(out.parent.glob(re.sub(r"%[Aaj]", "*", out.name))))
    return Job(job_id, returncode, states, output)


def assert_completed(job: Job, tasks: int = 1) -> None:
    assert job.returncode == 0, f"job {job.job_id} failed (exit {job.returncode}):\n{job.output}"
    assert len(job.states) == tasks and all(s == ("COMPLETED", "0:0") for s in job.states), job.states
    assert "Traceback" not in job.output and "error" not in job.output.lower(), job.output


def assert_log(path: Path, world_size: int, clients: int = 8) -> float:
    """The log holds ROUNDS rounds run on world_size ranks; returns the last eval loss."""
    with h5py.File(path, "r") as log:
        assert log.attrs["world_size"] == world_size
        assert log.attrs["num_clients"] == clients
        assert completed_rounds(log) == list(range(ROUNDS))
        rounds = [log["rounds"][f"{r:05d}"] for r in range(ROUNDS)]
        assert [int(r.attrs["world_size"]) for r in rounds] == [world_size] * ROUNDS
        return float(rounds[-1].attrs["eval_loss"])


def test_single_node_job_on_cpus(slurm, tmp_path):
    log = tmp_path / "single.h5"
    job = submit("slurm_single_node.sbatch", CPUS, ["configs/demo.yaml", *FAST], tmp_path / "single-%j.out",
                 job_env(OUTPUT=str(log)))
    assert_completed(job)
    # no GPU asked for, none requested from srun; the demo ran its rounds on both tasks
    srun = f"+ srun --mpi=pmix --kill-on-bad-exit=1 florist-mpi run configs/demo.yaml --set run.output={log}"
    assert srun in job.output
    assert "gpus" not in job.output
    assert f"8 clients on {TASKS} rank(s), device cpu" in job.output
    assert f"done: {ROUNDS} rounds logged to {log}" in job.output
    assert_log(log, world_size=TASKS)


def test_multi_node_job_on_one_node(slurm, tmp_path):
    log = tmp_path / "multi.h5"
    job = submit(
        "slurm_multi_node.sbatch",
        ["--nodes=1", *CPUS],
        ["configs/demo.yaml", *FAST],
        tmp_path / "multi-%j.out",
        job_env(OUTPUT=str(log)),
    )
    assert_completed(job)
    assert f"{TASKS} ranks on 1 nodes" in job.output
    assert f"done: {ROUNDS} rounds logged to {log}" in job.output
    assert_log(log, world_size=TASKS)


# A study's runs: the demo cut to one short round.
STUDY_FAST = ["--set", "run.rounds=1", "--set", "train.local_steps=1", "--set", "data.synthetic.examples_per_client=16",
              "--set", "data.synthetic.eval_examples=32", "--set", "log.client_adapters=false"]


def logged_round(path: Path) -> dict:
    """Round 0's time_round and eval loss, and where the launch ran, read straight from the log."""
    with h5py.File(path, "r") as log:
        assert completed_rounds(log) == [0]
        group = log["rounds/00000"]
        return {"time_round": float(group.attrs["time_round"]), "eval_loss": float(group.attrs["eval_loss"]),
                "world_size": int(group.attrs["world_size"]), "clients": group["ranks/clients"][()].tolist(),
                **{key: log.attrs[key] for key in ("slurm_job_id", "slurm_array_job_id", "slurm_array_task_id",
                                                   "num_nodes")}}


def test_scaling_study_array_then_its_report_by_dependency(slurm, tmp_path):
    """The study as an array of three pairs (4 clients on 1 and 2 ranks, 8 on 2), one round each, then
    jobs/scaling_report.sh as a job that waits for the array (--dependency=afterok). The report's speed-up
    and efficiencies are the ratios of the round times in the logs."""
    scaling = tmp_path / "scaling"
    env = job_env(PAIRS="4:1 4:2 8:2", SCALING_DIR=str(scaling))
    study_out = tmp_path / "scaling-%A_%a.out"
    study_id = submit_now("scaling_study.sbatch", ["--nodes=1", "--array=0-2", *CPUS],
                          ["configs/demo.yaml", *STUDY_FAST], study_out, env)
    # a failed array task makes the dependency impossible: Slurm then cancels the report instead of keeping it
    report = submit("scaling_report.sh", [f"--dependency=afterok:{study_id}", "--kill-on-invalid-dep=yes"], [],
                    tmp_path / "report-%j.out", env)
    study = job_record(study_id, 0, study_out)
    assert_completed(study, tasks=3)
    for ranks in (1, 2):
        assert f"+ srun --mpi=pmix --kill-on-bad-exit=1 --nodes=1 --ntasks={ranks} --ntasks-per-node={ranks} " \
               "florist-mpi run" in study.output
    assert_completed(report)

    logs = {(c, n): logged_round(scaling / f"clients{c}_ranks{n}_rep0.h5") for c, n in ((4, 1), (4, 2), (8, 2))}
    for index, ((clients, ranks), log) in enumerate(logs.items()):
        assert log["world_size"] == ranks and sum(log["clients"]) == clients and log["num_nodes"] == 1
        assert (log["slurm_array_job_id"], log["slurm_array_task_id"]) == (study_id, str(index))
        assert log["slurm_job_id"].isdigit()
    # every random choice derives from (seed, round, client): the rank count does not change the result
    assert logs[(4, 2)]["eval_loss"] == pytest.approx(logs[(4, 1)]["eval_loss"], rel=1e-4)

    assert "speed-up" in report.output and "efficiency" in report.output and "(3 logs)" in report.output
    document = json.loads((scaling / "scaling.json").read_text())
    runs = {(run["num_clients"], run["world_size"]): run for run in document["runs"]}
    speedup = logs[(4, 1)]["time_round"] / logs[(4, 2)]["time_round"]
    assert runs[(4, 2)]["speedup"] == pytest.approx(speedup)
    assert runs[(4, 2)]["efficiency"] == pytest.approx(speedup / 2)
    assert runs[(8, 2)]["weak_efficiency"] == pytest.approx(logs[(4, 1)]["time_round"] / logs[(8, 2)]["time_round"])
    assert runs[(8, 2)]["speedup"] is None  # 8 clients ran on one world size only
    assert len(pd.read_csv(scaling / "scaling.csv")) == 3
    assert {p.name for p in (scaling / "plots").iterdir()} == {
        "scaling_speedup.png", "scaling_efficiency.png", "scaling_phases.png", "scaling_vs_clients.png"}


@pytest.mark.parametrize("script, name", [("slurm_single_node.sbatch", "florist-mpi"),
                                          ("slurm_multi_node.sbatch", "florist-mpi-multi"),
                                          ("scaling_report.sh", "florist-scaling-report")])
def test_output_files_are_named_after_the_job(slurm, tmp_path, script, name):
    """Without --output the job writes `<job name>-<job id>.out` where it was submitted (held, never run)."""
    result = subprocess.run(["sbatch", "--hold", "--parsable", "--nodes=1", *CPUS, str(JOBS / script)], cwd=tmp_path,
                            env=job_env(), capture_output=True, text=True, timeout=60)
    job_id = result.stdout.strip().split(";")[0]
    assert result.returncode == 0 and job_id.isdigit(), result.stderr
    try:
        shown = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], capture_output=True, text=True)
        assert f"StdOut={tmp_path}/{name}-{job_id}.out" in shown.stdout.split(), shown.stdout
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)


def node_gpus() -> int:
    shown = subprocess.run(["scontrol", "--oneliner", "show", "node"], capture_output=True, text=True).stdout
    counts = [int(n) for n in re.findall(r"\bGres=gpu(?::[\w-]+)?:(\d+)", shown)]
    return max(counts, default=0)


@pytest.mark.parametrize("script", ["slurm_single_node.sbatch", "slurm_multi_node.sbatch", "scaling_study.sbatch"])
def test_gpus_asked_at_submission_reach_every_task(slurm, tmp_path, script):
    """`SBATCH_GPUS_PER_TASK=1 sbatch ...` (same as `sbatch --gpus-per-task=1`): Slurm puts it in
    the job, the script passes --gpus-per-task=1 to srun, and each task gets a GPU of its own.
    A stand-in florist-mpi reports what each task was given (CUDA cannot run here anyway)."""
    if node_gpus() < TASKS:
        pytest.skip(
            f"the Slurm node has fewer than {TASKS} GPUs (`SLURM_FAKE_GPUS={TASKS} .ci/slurm.sh start` "
            "declares counted ones on a machine without)"
        )
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stand_in = venv / "bin" / "florist-mpi"
    stand_in.write_text(
        "#!/usr/bin/env bash\n"
        'echo "task $SLURM_PROCID of $SLURM_STEP_NUM_TASKS: step gpus ${SLURM_STEP_GPUS:-none}, '
        'cuda ${CUDA_VISIBLE_DEVICES:-none}, gpus per task ${SLURM_GPUS_PER_TASK:-none}, args $*"\n'
    )
    stand_in.chmod(0o755)
    env = job_env(
        VENV=str(venv),
        OUTPUT=str(tmp_path / "gpu.h5"),
        SBATCH_GPUS_PER_TASK="1",
        PAIRS="4:2",
        SCALING_DIR=str(tmp_path / "scaling"),
    )
    flags = ["--nodes=1", *CPUS] + (["--array=0"] if script == "scaling_study.sbatch" else [])
    job = submit(script, flags, ["configs/demo.yaml"], tmp_path / "gpu-%j.out", env)
    assert_completed(job)
    assert re.search(
        r"^\+ srun --mpi=pmix --kill-on-bad-exit=1 (--nodes=1 --ntasks=2 --ntasks-per-node=2 )?--gpus-per-task=1 "
        r"florist-mpi run", job.output, re.M
    ), job.output
    tasks = re.findall(
        r"^task (\d) of 2: step gpus (\d+), cuda (\d+), gpus per task 1, args run configs/demo.yaml", job.output, re.M
    )
    assert sorted(t[0] for t in tasks) == ["0", "1"], job.output
    assert sorted(t[1] for t in tasks) == ["0", "1"] and all(t[1] == t[2] for t in tasks), tasks  # one GPU each


@pytest.mark.parametrize("plugin", ["pmi2", "none"])
def test_launch_without_a_joint_mpi_world_is_refused(slurm, tmp_path, plugin):
    """srun --mpi=pmi2 (or none) starts two 1-rank worlds of the Open MPI 5 wheel: both refuse, nothing is written."""
    log = tmp_path / "runs" / "refused.h5"
    florist = Path(sys.executable).parent / "florist-mpi"
    launcher = [str(florist)] if florist.exists() else [sys.executable, "-m", "florist_mpi.cli"]
    result = subprocess.run(
        [
            "srun",
            "-n",
            str(TASKS),
            f"--mpi={plugin}",
            "--kill-on-bad-exit=1",
            "--time=00:05:00",
            *launcher,
            "run",
            "configs/demo.yaml",
            "--set",
            f"run.output={log}",
        ],
        cwd=REPO,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("florist-mpi")]
    assert len(ours) == TASKS and len(set(ours)) == 1, result.stderr  # one line from each task, the same
    assert re.fullmatch(
        r"florist-mpi: error: the launcher started 2 tasks \((PMI_SIZE|SLURM_STEP_NUM_TASKS)=2\) "
        r"but MPI sees a world of 1 process.*`srun --mpi=pmix`.*mpirun.*",
        ours[0],
    ), ours[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not log.exists() and not log.parent.exists()
