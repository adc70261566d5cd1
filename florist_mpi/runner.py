"""`florist-mpi run`: the federated round loop.

Rank 0 checks everything the user gave (config, log, data, model) before any rank
does work, then every round: sample clients -> local training on the ranks that
host them -> gather factors to rank 0 (MPI buffers) -> aggregate -> broadcast ->
every rank merges the global update -> evaluate -> rank 0 appends the round to the
log. See docs/log-format.md for what is recorded.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from florist_mpi import comm
from florist_mpi.config import ExperimentConfig, load_config, parse_config_text, resume_mismatch
from florist_mpi.errors import USER_ERRORS, UserError
from florist_mpi.preflight import check_inputs, check_run_settings


def add_arguments(parser) -> None:
    parser.add_argument("config", help="experiment YAML (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set federation.tau=0.8 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue the run recorded in run.output")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing run.output and its round folder (the old log stays until round 0 completes)",
    )
    parser.add_argument("--verbose", action="store_true", help="per-client lines from every rank")


def main(args) -> int:
    world = comm.init_world()
    check_launch(world.size, os.environ)  # before any work: a broken launch writes nothing
    try:
        return run_job(world, args)
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 - any failure must end every rank
        _fail(world, err, debug=getattr(args, "debug", False))


def _fail(world, err: BaseException, debug: bool):
    from florist_mpi.errors import SharedFailure

    if isinstance(err, SharedFailure) and not world.is_root:
        world.barrier()  # rank 0 reports it and aborts the job; wait to be ended
    user = isinstance(err, USER_ERRORS)
    prefix = f"florist-mpi: error (rank {world.rank}): " if world.size > 1 else "florist-mpi: error: "
    if user and not debug:
        message = prefix + UserError.one_line(err)
    elif isinstance(err, SharedFailure) and not debug:
        message = prefix.replace(f" (rank {world.rank})", "") + str(err)
    elif isinstance(err, KeyboardInterrupt):
        message = prefix + "interrupted"
    else:
        message = prefix + f"{err.__class__.__name__}: {err}\n" + "".join(traceback.format_exception(err))
    if world.size == 1:
        if isinstance(err, SharedFailure) and not debug:  # a verdict on the run, not a bug: one line
            print(message, file=sys.stderr, flush=True)
            raise SystemExit(1)
        raise err  # the CLI prints user errors as one line (exit 2), anything else with its traceback
    comm.abort(world, message, code=2 if user else 1)


def check_launch(world_size: int, environ: Mapping[str, str]) -> None:
    """Refuse N tasks that each see an MPI world of one: they would be N independent runs
    writing the same log. Raised on every such process (each is its own world of one, so
    each prints the line and exits 2)."""
    launched = comm.launcher_size(environ)
    if world_size != 1 or launched is None or launched.tasks <= 1:
        return
    raise UserError(
        f"the launcher started {launched.tasks} tasks ({launched.variable}={launched.tasks}) but MPI sees a world "
        "of 1 process, so each task would run alone on the same log: launch with `srun --mpi=pmix` "
        "(Open MPI 5 and other PMIx builds; `srun --mpi=list` shows the plugins) or with mpirun/mpiexec "
        "inside the allocation"
    )


# ---------------------------------------------------------------- preflight (rank 0)


@dataclass
class Plan:
    """What rank 0 decided before any work; broadcast to every rank as JSON."""

    config_yaml: str
    resume_from: int = -1  # last completed round in the log being resumed
    overwrite: bool = False
    error: str | None = None
    done: str | None = None  # set when a resumed log already holds every round: nothing to run


def _preflight(args) -> Plan:
    cfg = load_config(args.config, args.overrides)
    output = Path(cfg.run.output)
    plan = Plan(config_yaml=cfg.to_yaml(), overwrite=bool(args.overwrite))
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other: pass only one")
    if args.resume:
        plan.resume_from = _check_resumable(output, cfg)
        if plan.resume_from + 1 == cfg.run.rounds:
            plan.done = (
                f"log '{output}' already holds all {cfg.run.rounds} rounds: nothing to do "
                "(raise run.rounds to continue it)"
            )
            return plan
    elif output.exists() and not args.overwrite:
        raise UserError(
            f"log '{output}' already exists: pass --resume to continue it, --overwrite to replace it, "
            "or set run.output to a new path"
        )
    if output.exists() and output.is_dir():
        raise UserError(f"run.output '{output}' is a directory: give a file path such as runs/demo.h5")
    if not args.resume:
        _check_rounds_folder(output, replace=bool(args.overwrite))
    check_run_settings(cfg)
    check_inputs(cfg)
    return plan


def _check_rounds_folder(output: Path, replace: bool) -> None:
    """The log keeps its round files in `<run.output>.rounds/`: that name must be free for a folder,
    and a folder there must hold no other log's round files (the run would have to write beside them)."""
    from florist_mpi import storage

    storage.check_new_log(output, replace=replace)


def _check_resumable(output: Path, cfg: ExperimentConfig) -> int:
    from florist_mpi import storage

    if not output.exists():
        moved = (
            f" (its round folder '{storage.rounds_folder(output)}' is there: was the log file moved or renamed?)"
            if storage.rounds_folder(output).is_dir()
            else ""
        )
        raise UserError(f"cannot resume: log '{output}' does not exist{moved}; drop --resume to start a new run")
    with storage.open_log(output, verify=True) as handle:  # every round file opens: the replay will read them
        logged = parse_config_text(storage.decode_str(handle.attrs["config"]), source=f"log '{output}'")
        rounds = storage.completed_rounds(handle)
    differing = resume_mismatch(logged, cfg)
    if differing:
        raise UserError(
            f"cannot resume '{output}': config key '{differing}' differs from the logged run; "
            "restore it or start a new run with another run.output"
        )
    if rounds != list(range(len(rounds))):
        raise UserError(f"cannot resume '{output}': its rounds {rounds} are not contiguous from 0")
    if len(rounds) > cfg.run.rounds:
        raise UserError(
            f"cannot resume '{output}': it already holds {len(rounds)} rounds but run.rounds is "
            f"{cfg.run.rounds}; set run.rounds to at least {len(rounds)}"
        )
    return len(rounds) - 1


def _agree_on_plan(world, args) -> Plan:
    """Rank 0 validates; everyone gets the same verdict, so bad input fails before any work."""
    payload = None
    if world.is_root:
        try:
            plan = _preflight(args)
        except USER_ERRORS as err:
            if world.size == 1:
                raise
            plan = Plan(config_yaml="", error=UserError.one_line(err))
        payload = json.dumps(plan.__dict__).encode()
    if world.size > 1:
        payload = comm.bcast_bytes(world, payload)
    plan = Plan(**json.loads(payload))
    if plan.error:
        if world.is_root:
            print(f"florist-mpi: error: {plan.error}", file=sys.stderr)
        raise SystemExit(2)
    if plan.done and world.is_root:
        print(f"florist-mpi: {plan.done}", flush=True)
    return plan


# ------------------------------------------------------------------------ the job


def run_job(world, args) -> int:
    plan = _agree_on_plan(world, args)
    if plan.done:
        return 0
    cfg = parse_config_text(plan.config_yaml)
    from florist_mpi.federation import Federation

    federation = Federation(world, cfg, plan, verbose=args.verbose)
    federation.run()
    return 0
