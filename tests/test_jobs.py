"""The job scripts in jobs/: valid bash, and every `florist-mpi` call parses with the real CLI."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from florist_mpi import cli

JOBS = Path(__file__).resolve().parents[1] / "jobs"
SCRIPTS = sorted(p for p in JOBS.iterdir() if p.suffix in (".sh", ".sbatch"))
SBATCH = [p for p in SCRIPTS if p.suffix == ".sbatch"]
PLACEHOLDER = "placeholder"

# ${NAME:-default} with no nested expansion inside (innermost first), ${NAME}, $NAME, ${NAME[@]}
BRACED = re.compile(r"\$\{(\w+)(?::-([^{}$]*))?\}")
ARRAY = re.compile(r"\$\{(\w+)\[@\]\}")
PLAIN = re.compile(r"\$(\w+)")
ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?(\w+)=(.*)$")
SHELL_END = re.compile(r"\s(?:[0-9]?>>?|\||&&|\|\||;)\s|\s[0-9]?>\S")


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line for line in joined.splitlines() if not line.lstrip().startswith("#")]


def expand(text: str, values: dict[str, str]) -> str:
    """Replace shell expansions: known values, else the ${VAR:-default}, else a placeholder."""
    text = text.replace('"$@"', "").replace('"$*"', "").replace("$@", "").replace("$*", "")
    text = ARRAY.sub(PLACEHOLDER, text)
    previous = None
    while previous != text:
        previous = text
        text = BRACED.sub(lambda m: values.get(m.group(1), m.group(2) if m.group(2) is not None else PLACEHOLDER), text)
    return PLAIN.sub(lambda m: values.get(m.group(1), PLACEHOLDER), text)


def script_values(lines: list[str]) -> dict[str, str]:
    """Variables the script assigns, resolved to their defaults (in order of assignment)."""
    values: dict[str, str] = {}
    for line in lines:
        match = ASSIGNMENT.match(line)
        if match and not match.group(2).startswith("("):
            name, raw = match.groups()
            if re.search(r"\$\{\w+(?:\[|[#%/^,])", raw) or "$((" in raw:
                continue  # array items, pattern removal, arithmetic: left to the placeholder
            try:
                words = shlex.split(expand(raw, values))
            except ValueError:
                continue
            values[name] = words[0] if len(words) == 1 else " ".join(words) if words else ""
    return values


def florist_invocations(path: Path) -> list[list[str]]:
    """Every `florist-mpi SUBCOMMAND ...` in the script, as argv (after `florist-mpi`)."""
    lines = logical_lines(path.read_text())
    values = script_values(lines)
    found = []
    for line in lines:
        start = line.find("florist-mpi ")
        if start < 0 or line.lstrip().startswith(("echo ", "printf ")):
            continue
        command = line[start:]
        end = SHELL_END.search(command)
        if end:
            command = command[: end.start()]
        argv = shlex.split(expand(command, values))
        if argv and argv[0] == "florist-mpi":
            found.append(argv[1:])
    return found


def test_there_are_scripts():
    names = {p.name for p in SCRIPTS}
    assert {"slurm_single_node.sbatch", "slurm_multi_node.sbatch", "mpirun_local.sh", "scaling_study.sbatch",
            "scaling_report.sh"} <= names
    assert (JOBS / "README.md").is_file()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash_with_strict_mode(script):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    result = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash") or text.startswith("#!/bin/bash")
    assert "set -euo pipefail" in text


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_florist_invocations_parse_with_the_real_cli(script):
    invocations = florist_invocations(script)
    assert invocations, f"{script.name} runs no florist-mpi command"
    parser = cli.build_parser()
    for argv in invocations:
        assert argv and argv[0] in cli.SUBCOMMANDS, f"{script.name}: unknown subcommand in florist-mpi {' '.join(argv)}"
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{script.name}: florist-mpi {' '.join(argv)} is rejected by the CLI parser")


def test_the_expected_commands_are_there():
    single = florist_invocations(JOBS / "slurm_single_node.sbatch")
    assert single[0][:2] == ["run", "configs/demo.yaml"] and any(a.startswith("run.output=") for a in single[0])
    scaling = florist_invocations(JOBS / "scaling_study.sbatch")[0]
    assert any(a.startswith("federation.num_clients=") for a in scaling)
    assert any(re.fullmatch(r"run\.output=runs/scaling/clients.+_ranks.+_rep.+\.h5", a) for a in scaling)
    report = florist_invocations(JOBS / "scaling_report.sh")
    scaling_reports = [argv for argv in report if argv[0] == "report" and "--scaling" in argv]
    assert {"--csv", "--json", "--plots"} <= {a for argv in scaling_reports for a in argv}
    local = florist_invocations(JOBS / "mpirun_local.sh")
    assert local[0][0] == "run"


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_sbatch_scripts_request_tasks_and_no_gpus_unless_asked(script):
    text = script.read_text()
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    joined = "\n".join(directives)
    assert "--ntasks-per-node" in joined
    assert "--time" in joined and "--output" in joined
    # GPUs only where the user asks (sbatch --gpus-per-task=N): a CPU node must take the job as it is
    assert "gpu" not in joined.lower() and "gres" not in joined
    # srun gets its flags from one array: the MPI plugin, kill-on-bad-exit (a rank that dies must
    # end the step, not leave the others blocked in a collective) and GPUs only when asked
    lines = logical_lines(text)
    sruns = [line for line in lines if line.lstrip().startswith("srun ")]
    assert sruns and all(line.lstrip().startswith('srun "${srun_flags[@]}"') for line in sruns)
    assert all("gpu" not in line for line in sruns)
    flags = [line for line in lines if line.strip().startswith("srun_flags=(")]
    assert len(flags) == 1 and '--mpi="$SRUN_MPI"' in flags[0] and "--kill-on-bad-exit=1" in flags[0]
    assert "gpu" not in flags[0]
    # Slurm ignores #SBATCH lines after the first command
    body = [line for line in text.splitlines()[1:] if line.strip() and not line.startswith("#")]
    first_command = text.splitlines().index(body[0])
    assert all(text.splitlines().index(d) < first_command for d in directives)


def fake_srun(tmp_path: Path) -> Path:
    """A directory whose `srun` prints the arguments it was given instead of launching anything."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/usr/bin/env bash\necho "SRUN $*"\n')
    srun.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
@pytest.mark.parametrize("job_env, gpu_flag", [
    ({}, None),                                                 # CPU node: no GPU asked for
    ({"SLURM_GPUS_PER_TASK": "1"}, "--gpus-per-task=1"),        # what sbatch --gpus-per-task=1 sets in the job
    ({"SLURM_GPUS_PER_TASK": "1", "GPUS_PER_TASK": "2"}, "--gpus-per-task=2"),  # the variable overrides it
], ids=["cpu", "sbatch-gpus", "variable"])
def test_srun_line_passes_gpus_on_only_when_asked(tmp_path, script, job_env, gpu_flag):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    env = {"PATH": f"{fake_srun(tmp_path)}:/usr/bin:/bin", "VENV": str(tmp_path / "none"), "SLURM_JOB_ID": "42",
           "SLURM_ARRAY_TASK_ID": "1", "OUTPUT": str(tmp_path / "run.h5"), "SCALING_DIR": str(tmp_path / "scaling"),
           **job_env}
    result = subprocess.run([bash, str(script), "configs/demo.yaml", "--set", "run.rounds=1"], capture_output=True,
                            text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    srun = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("SRUN ")]
    assert len(srun) == 1
    argv = srun[0]
    assert argv[:2] == ["--mpi=pmix", "--kill-on-bad-exit=1"]
    assert [a for a in argv if a.startswith(("--gpu", "--gres"))] == ([gpu_flag] if gpu_flag else [])
    assert argv[argv.index("florist-mpi"):][:3] == ["florist-mpi", "run", "configs/demo.yaml"]
    assert argv[-2:] == ["--set", "run.rounds=1"]
    if script.name == "scaling_study.sbatch":  # the second default pair, 8 clients on 2 ranks, on one node
        assert argv[2:5] == ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2"] and "federation.num_clients=8" in argv
    # the echoed command is the one that ran
    echoed = [line for line in result.stdout.splitlines() if line.startswith("+ srun ")]
    assert len(echoed) == 1 and echoed[0].startswith("+ srun " + " ".join(argv[: argv.index("florist-mpi")]))


def test_mpirun_local_adds_root_flags_only_when_asked(tmp_path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    fake = tmp_path / "fake-mpiexec"
    fake.write_text("#!/usr/bin/env bash\necho \"ARGS $*\"\n")
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "MPIEXEC": str(fake), "VENV": str(tmp_path / "none"), "NP": "3"}
    for setting, expect in (("1", True), ("0", False)):
        result = subprocess.run([bash, str(JOBS / "mpirun_local.sh"), "--set", "run.rounds=1"], capture_output=True,
                                text=True, env={**env, "MPI_ROOT_FLAGS": setting})
        assert result.returncode == 0, result.stderr
        line = [ln for ln in result.stdout.splitlines() if ln.startswith("ARGS")][0]
        assert ("--allow-run-as-root --oversubscribe" in line) == expect
        assert line.endswith("-n 3 florist-mpi run configs/demo.yaml --set run.rounds=1")


def test_mpirun_local_gives_each_rank_its_share_of_the_cores_unless_told(tmp_path):
    import os

    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    fake = tmp_path / "fake-mpiexec"
    fake.write_text("#!/usr/bin/env bash\necho \"THREADS $OMP_NUM_THREADS\"\n")
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "MPIEXEC": str(fake), "VENV": str(tmp_path / "none"), "MPI_ROOT_FLAGS": "0"}
    cores = len(os.sched_getaffinity(0))  # what nproc counts
    for ranks, preset, expect in (("1", None, cores), ("2", None, max(1, cores // 2)), ("64", None, 1),
                                  ("2", "5", 5)):
        run_env = {**env, "NP": ranks, **({"OMP_NUM_THREADS": preset} if preset else {})}
        result = subprocess.run([bash, str(JOBS / "mpirun_local.sh")], capture_output=True, text=True, env=run_env)
        assert result.returncode == 0, result.stderr
        assert f"THREADS {expect}" in result.stdout.splitlines(), (ranks, preset, result.stdout)


def test_scaling_overrides_make_a_valid_config_for_any_client_count():
    from florist_mpi.config import load_config

    argv = florist_invocations(JOBS / "scaling_study.sbatch")[0]
    config = JOBS.parent / argv[1]
    for clients in ("4", "16", "32"):
        overrides = [argv[i + 1].replace(PLACEHOLDER, clients) for i, a in enumerate(argv) if a == "--set"]
        cfg = load_config(config, overrides)
        assert cfg.federation.num_clients == int(clients)
        assert cfg.run.output == f"runs/scaling/clients{clients}_ranks{clients}_rep{clients}.h5"


def test_scaling_report_end_to_end(tmp_path):
    """jobs/scaling_report.sh over a synthetic study writes the scaling text, CSV, JSON, rounds and plots."""
    import json
    import sys

    import pandas as pd
    from study_logs import write_study_log

    bash = shutil.which("bash")
    florist = Path(sys.executable).parent / "florist-mpi"
    if bash is None or not florist.exists():
        pytest.skip("needs bash and the florist-mpi entry point next to this Python")
    scaling = tmp_path / "scaling"
    scaling.mkdir()
    round_s = {1: [3.0, 2.0], 2: [2.0, 1.25]}
    for ranks, seconds in round_s.items():
        write_study_log(scaling / f"clients4_ranks{ranks}_rep0.h5", clients=4, round_s=seconds,
                        train_s=[[1.0] * ranks] * 2)
    env = {"PATH": f"{florist.parent}:/usr/bin:/bin", "SCALING_DIR": str(scaling), "VENV": str(tmp_path / "none"),
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    # SKIP_FIRST_ROUND=1: round 1 alone (the slurm test runs the script without it)
    result = subprocess.run([bash, str(JOBS / "scaling_report.sh")], capture_output=True, text=True,
                            env={**env, "SKIP_FIRST_ROUND": "1"}, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "speed-up" in result.stdout and "(2 logs)" in result.stdout
    assert (scaling / "scaling.txt").read_text() in result.stdout
    document = json.loads((scaling / "scaling.json").read_text())
    assert document["study"]["skip_first_round"] is True
    two = next(r for r in document["runs"] if r["world_size"] == 2)
    assert two["speedup"] == pytest.approx(2.0 / 1.25) and two["efficiency"] == pytest.approx(2.0 / 1.25 / 2)
    assert len(pd.read_csv(scaling / "scaling.csv")) == 2 and len(pd.read_csv(scaling / "rounds.csv")) == 4
    assert {p.name for p in (scaling / "plots").iterdir()} == {
        "scaling_speedup.png", "scaling_efficiency.png", "scaling_phases.png", "scaling_vs_clients.png"}

    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run([bash, str(JOBS / "scaling_report.sh")], capture_output=True, text=True,
                            env={**env, "SCALING_DIR": str(empty)}, cwd=tmp_path)
    assert result.returncode == 2 and "no logs in" in result.stderr


@pytest.mark.parametrize("script", SBATCH + [JOBS / "scaling_report.sh"], ids=lambda p: p.name)
def test_output_files_are_named_after_the_job_and_ignored_by_git(script):
    """`<job name>-<job id>.out` (arrays: `<job name>-<array id>_<index>.out`), matched by .gitignore."""
    import fnmatch

    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script.read_text(), re.M))
    name, output = directives["job-name"], directives["output"]
    assert name.startswith("florist-")
    resolved = output.replace("%x", name).replace("%A", "12").replace("%a", "0").replace("%j", "12")
    assert resolved == (f"{name}-12_0.out" if "array" in directives else f"{name}-12.out")
    ignored = [line.lstrip("/") for line in (JOBS.parent / ".gitignore").read_text().splitlines()
               if line and not line.startswith("#")]
    assert any(fnmatch.fnmatch(resolved, pattern) for pattern in ignored)


def run_study_script(tmp_path, **variables) -> subprocess.CompletedProcess:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    env = {"PATH": f"{fake_srun(tmp_path)}:/usr/bin:/bin", "VENV": str(tmp_path / "none"),
           "SCALING_DIR": str(tmp_path / "scaling"), **variables}
    return subprocess.run([bash, str(JOBS / "scaling_study.sbatch"), "configs/demo.yaml"], capture_output=True,
                          text=True, env=env, cwd=tmp_path)


@pytest.mark.parametrize("index, repeats, pair, repeat", [(0, "1", "8:1", 0), (5, "1", "32:16", 0),
                                                          (7, "2", "8:2", 1), (11, "2", "32:16", 1)])
def test_study_repeats_go_into_the_log_name(tmp_path, index, repeats, pair, repeat):
    result = run_study_script(tmp_path, SLURM_ARRAY_TASK_ID=str(index), REPEATS=repeats)
    assert result.returncode == 0, result.stderr
    clients, ranks = pair.split(":")
    log = tmp_path / "scaling" / f"clients{clients}_ranks{ranks}_rep{repeat}.h5"
    assert f"--set run.output={log} --set federation.num_clients={clients}" in result.stdout
    assert f"repeat {repeat} of {repeats}" in result.stdout


@pytest.mark.parametrize("pair, per_node, nodes, expected", [
    ("8:1", "8", "2", ["--nodes=1", "--ntasks=1", "--ntasks-per-node=1"]),
    ("8:8", "8", "2", ["--nodes=1", "--ntasks=8", "--ntasks-per-node=8"]),     # fits one node: stays on it
    ("32:16", "8", "2", ["--nodes=2", "--ntasks=16", "--ntasks-per-node=8"]),
    ("32:12", "8", "2", ["--nodes=2", "--ntasks=12", "--ntasks-per-node=6"]),  # evenly: 6 + 6, not 8 + 4
    ("8:4", "4(x2)", "2", ["--nodes=1", "--ntasks=4", "--ntasks-per-node=4"]),  # SLURM_TASKS_PER_NODE form
])
def test_study_places_each_pair_on_as_few_nodes_as_possible(tmp_path, pair, per_node, nodes, expected):
    variable = "SLURM_TASKS_PER_NODE" if "(" in per_node else "SLURM_NTASKS_PER_NODE"
    result = run_study_script(tmp_path, SLURM_ARRAY_TASK_ID="0", PAIRS=pair, SLURM_JOB_NUM_NODES=nodes,
                              **{variable: per_node})
    assert result.returncode == 0, result.stderr
    srun = next(line.split()[1:] for line in result.stdout.splitlines() if line.startswith("SRUN "))
    assert srun[2:5] == expected


@pytest.mark.parametrize("variables, message", [
    ({"PAIRS": "32:16", "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_NUM_NODES": "2"},
     "pair 32:16 needs 4 node(s) at up to 4 ranks per node but the job has 2: submit with --nodes=4"),
    ({"PAIRS": "8:8", "RANKS_PER_NODE": "1", "SLURM_JOB_NUM_NODES": "2"}, "pair 8:8 needs 8 node(s)"),
    ({"PAIRS": "2:4"}, "pair 2:4 has more ranks than clients"),
    ({"PAIRS": "8x2"}, "pair '8x2' in PAIRS is not clients:ranks"),
    ({"REPEATS": "0"}, "REPEATS=0 is not a positive integer"),
    ({"SLURM_ARRAY_TASK_ID": "6"}, "array index 6 has no pair and repeat (6 pairs in PAIRS x REPEATS=1): "
                                   "submit with --array=0-5"),
])
def test_study_refuses_what_cannot_run_with_one_line(tmp_path, variables, message):
    result = run_study_script(tmp_path, **{"SLURM_ARRAY_TASK_ID": "0", **variables})
    assert result.returncode == 2 and "SRUN" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scaling_study: ") and message in lines[0], result.stderr
