"""Reading run logs for analysis: `open_run(path)` gives a `Run` with pandas frames.

The log layout is docs/log-format.md. Opening reads the header and a small per-round
summary (round attributes, client counts, global ranks and energies) in one pass and
closes the file; factors, spectra and client tables are read on demand, each call
opening and closing the file again, so a `Run` never holds the file open.

    >>> from florist_mpi.analysis import open_run
    >>> run = open_run("runs/demo.h5")
    >>> run.rounds[["eval_loss", "mean_rank", "cum_bytes_down"]]
    >>> run.ranks                       # module x round global ranks
    >>> B, A = run.global_factors(-1)["model.layers.0.self_attn.q_proj"]

Both forms of a log are read alike: the log file with its round folder beside it
(`runs/demo.h5` + `runs/demo.h5.rounds/`, what runs write) and a single file (format 1,
or made by `florist-mpi pack`). Every problem with the file (a directory, missing, not
HDF5, truncated, not a florist_mpi log, a missing or partly copied round folder, a round
that is not there) is a `storage.LogError` with a one-line message; negative
round indices count from the end, as in Python.
"""
from __future__ import annotations

import json
import math
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from florist_mpi import storage
from florist_mpi.config import ConfigError, ExperimentConfig, parse_config_text
from florist_mpi.storage import LogError

# Round attributes in the order the frames show them (docs/log-format.md).
PHASES = ("time_train", "time_gather", "time_aggregate", "time_broadcast", "time_merge", "time_eval")
# time_round: rank 0's wall time of the round, time_log (its write to the log) included; time_wait: the longest wait
# of a rank for the slowest one at the exchange (NaN in logs written before they existed).
ROUND_ATTRS = ("eval_loss", "eval_accuracy", "tau", *PHASES, "time_wait", "time_log", "time_round", "bytes_up",
               "bytes_down", "world_size")
INTEGER_ATTRS = ("bytes_up", "bytes_down", "world_size")
# Columns `Run.rounds` derives from the log on top of the round attributes.
DERIVED_COLUMNS = (
    "num_sampled", "num_clients", "num_excluded", "mean_rank", "min_rank", "max_rank", "total_rank",
    "mean_energy", "time_total", "cum_bytes_up", "cum_bytes_down",
)

CLIENT_ADAPTERS_HINT = "rerun with log.client_adapters: true (e.g. --set log.client_adapters=true)"


def open_run(path: str | Path) -> "Run":
    """Read a run log's header and round summary; raises LogError for anything that is not a readable log."""
    path = Path(path)
    with _reading(path, verify=True) as handle:  # opens every round once anyway: check their files open
        attrs = handle.attrs
        try:
            config = parse_config_text(storage.decode_str(attrs["config"]), source=f"log '{path}'")
        except ConfigError as err:
            raise LogError(f"the config stored in log '{path}' cannot be read ({err}): the log is damaged or was "
                           "written by another florist_mpi version; use an intact log or that version") from None
        modules = storage.read_modules(handle)
        shapes = np.asarray(attrs.get("module_shapes", np.zeros((0, 2))), dtype=np.int64).reshape(-1, 2)
        if len(shapes) != len(modules):
            raise LogError(f"log '{path}' lists {len(modules)} modules but {len(shapes)} module shapes: "
                           "the file is damaged, use another copy of the log")
        try:
            versions = json.loads(storage.decode_str(attrs.get("versions", "{}")))
        except json.JSONDecodeError:
            versions = {}
        rounds = storage.completed_rounds(handle)
        world_size = int(attrs.get("world_size", 1))
        summary = _read_summary(handle, rounds, modules, world_size)
        launch = {key: _plain(attrs[key]) for key in LAUNCH_ATTRS if key in attrs}
        run = Run(
            path=path,
            config=config,
            method=storage.decode_str(attrs.get("method", config.federation.method)),
            tau=float(attrs.get("tau", config.federation.tau)),
            num_clients=int(attrs.get("num_clients", config.federation.num_clients)),
            world_size=world_size,
            created=storage.decode_str(attrs.get("created", "")),
            versions=versions,
            modules=modules,
            module_shapes={m: (int(s[0]), int(s[1])) for m, s in zip(modules, shapes)},
            initial_eval_loss=float(attrs.get("initial_eval_loss", math.nan)),
            round_indices=rounds,
            launch=launch,
        )
    run._rounds_frame, run._ranks_frame, run._energy_frame, run._per_rank_frame = summary
    return run


# Root attributes that say where the latest launch ran (docs/log-format.md).
LAUNCH_ATTRS = ("time_startup", "hosts", "num_nodes", "threads_per_rank", "startup_peak_rss_bytes", "peak_rss_scope",
                "slurm_job_id", "slurm_array_job_id", "slurm_array_task_id")


def _plain(value):
    """An HDF5 attribute as plain Python: str, int, float or a list of them."""
    if isinstance(value, np.ndarray):
        return [storage.decode_str(v) if isinstance(v, (bytes, str)) else v.item() for v in value.reshape(-1)]
    if isinstance(value, np.generic):
        return value.item()
    return storage.decode_str(value) if isinstance(value, bytes) else value


@contextmanager
def _reading(path: Path, verify: bool = False):
    """storage.open_log plus: anything h5py raises while reading becomes a one-line LogError."""
    with storage.open_log(path, verify=verify) as handle:
        try:
            yield handle
        except LogError:
            raise
        except (OSError, KeyError, RuntimeError, TypeError, ValueError) as err:
            detail = " ".join(str(err).split()) or err.__class__.__name__
            raise LogError(f"log '{path}' is damaged or incomplete ({detail}): use an intact copy of the log") from None


def _read_summary(handle, rounds: list[int], modules: list[str], world_size: int):
    """(rounds frame, ranks frame, energy frame) from one pass over the round groups.

    `world_size` (the header's) fills the rounds of logs written before rounds recorded their own.
    """
    records, rank_columns, energy_columns, per_rank = [], {}, {}, []
    group_of_rounds = handle["rounds"]
    for r in rounds:
        group = group_of_rounds[storage.round_key(r)]
        if "ranks" in group:  # every MPI rank's figures (logs from before have none)
            columns = {key: group["ranks"][key][()] for key in group["ranks"]}
            for rank in range(len(next(iter(columns.values()), []))):
                per_rank.append({"round": r, "rank": rank, **{k: v[rank].item() for k, v in columns.items()}})
        row = {}
        for key, value in group.attrs.items():
            row[key] = value.item() if isinstance(value, np.generic) else value
        clients = group["clients"]
        ids = clients["id"][()] if "id" in clients else np.zeros(0, dtype=np.int64)
        excluded = clients["excluded"][()] if "excluded" in clients else np.zeros(0, dtype=np.int64)
        num_excluded = len(set(excluded.tolist()) & set(ids.tolist())) if len(ids) else len(excluded)
        row["num_sampled"] = int(len(ids))
        row["num_clients"] = int(len(ids) - num_excluded)
        row["num_excluded"] = int(len(set(excluded.tolist())))
        global_group = group["global"]
        ranks, energies = [], []
        for module in modules:
            node_attrs = global_group[module].attrs
            ranks.append(int(node_attrs["rank"]))
            energies.append(float(node_attrs.get("energy", math.nan)))
        rank_columns[r] = ranks
        energy_columns[r] = energies
        records.append(row)

    extra = sorted({k for row in records for k in row} - set(ROUND_ATTRS) - set(DERIVED_COLUMNS))
    columns = list(ROUND_ATTRS) + extra
    frame = pd.DataFrame.from_records(records, index=pd.Index(rounds, name="round", dtype=np.int64),
                                      columns=columns + ["num_sampled", "num_clients", "num_excluded"])
    for key in ROUND_ATTRS:
        if key in INTEGER_ATTRS:
            frame[key] = frame[key].fillna(world_size if key == "world_size" else 0).astype(np.int64)
        else:
            frame[key] = frame[key].astype(np.float64)
    for key in ("num_sampled", "num_clients", "num_excluded"):
        frame[key] = frame[key].astype(np.int64)

    ranks_frame = pd.DataFrame(rank_columns, index=pd.Index(modules, name="module"), dtype=np.int64)
    ranks_frame.columns = pd.Index(rounds, name="round", dtype=np.int64)
    energy_frame = pd.DataFrame(energy_columns, index=pd.Index(modules, name="module"), dtype=np.float64)
    energy_frame.columns = pd.Index(rounds, name="round", dtype=np.int64)

    if modules and rounds:
        frame["mean_rank"] = ranks_frame.mean(axis=0).to_numpy()
        frame["min_rank"] = ranks_frame.min(axis=0).to_numpy()
        frame["max_rank"] = ranks_frame.max(axis=0).to_numpy()
        frame["total_rank"] = ranks_frame.sum(axis=0).to_numpy()
        frame["mean_energy"] = energy_frame.mean(axis=0).to_numpy()
    else:
        for key in ("mean_rank", "mean_energy"):
            frame[key] = pd.Series(np.nan, index=frame.index, dtype=np.float64)
        for key in ("min_rank", "max_rank", "total_rank"):
            frame[key] = pd.Series(0, index=frame.index, dtype=np.int64)
    frame["time_total"] = frame[list(PHASES)].fillna(0.0).sum(axis=1)
    frame["cum_bytes_up"] = frame["bytes_up"].cumsum()
    frame["cum_bytes_down"] = frame["bytes_down"].cumsum()
    frame = frame[list(ROUND_ATTRS) + list(DERIVED_COLUMNS) + extra]
    frame.index = pd.Index(rounds, name="round", dtype=np.int64)
    per_rank_frame = pd.DataFrame.from_records(per_rank, columns=["round", "rank", *_rank_columns(per_rank)])
    return frame, ranks_frame, energy_frame, per_rank_frame.set_index(["round", "rank"])


def _rank_columns(records: list[dict]) -> list[str]:
    present = {key for row in records for key in row} - {"round", "rank"}
    return [c for c in storage.RANK_COLUMNS if c in present] + sorted(present - set(storage.RANK_COLUMNS))


@dataclass(eq=False)
class Run:
    """One run log. Frames are copies: change them freely."""

    path: Path
    config: ExperimentConfig
    method: str
    tau: float
    num_clients: int
    world_size: int
    created: str
    versions: dict
    modules: list[str]
    module_shapes: dict[str, tuple[int, int]]  # module -> (out_features m, in_features n), in `modules` order
    initial_eval_loss: float
    round_indices: list[int]  # completed rounds, ascending
    # where the latest launch ran: time_startup, hosts, num_nodes, threads_per_rank, slurm ids (LAUNCH_ATTRS)
    launch: dict = field(default_factory=dict)
    _rounds_frame: pd.DataFrame = field(default=None, repr=False)
    _ranks_frame: pd.DataFrame = field(default=None, repr=False)
    _energy_frame: pd.DataFrame = field(default=None, repr=False)
    _per_rank_frame: pd.DataFrame = field(default=None, repr=False)

    # ------------------------------------------------------------ summary frames

    @property
    def rounds(self) -> pd.DataFrame:
        """One row per completed round (index `round`): the round attributes plus derived columns.

        Derived: num_sampled, num_clients (aggregated), num_excluded, mean/min/max/total_rank and
        mean_energy over modules, time_total (sum of the phases), cum_bytes_up, cum_bytes_down.
        `world_size` is the round's own attribute, or the header's in logs written before it existed.
        """
        return self._rounds_frame.copy()

    @property
    def ranks(self) -> pd.DataFrame:
        """Global rank r_g, module (rows, exchange order) x round (columns)."""
        return self._ranks_frame.copy()

    @property
    def per_rank(self) -> pd.DataFrame:
        """Every MPI rank's figures per round (the log's `ranks/` group), index (round, rank): time_train,
        time_wait, clients, peak_rss_bytes, mpi_bytes_sent, mpi_bytes_received (peak_gpu_bytes on GPU).
        Empty for logs written before rounds recorded them."""
        return self._per_rank_frame.copy()

    @property
    def energies(self) -> pd.DataFrame:
        """Retained energy fraction of each module's global factors, module x round."""
        return self._energy_frame.copy()

    @property
    def last_round(self) -> int | None:
        return self.round_indices[-1] if self.round_indices else None

    @property
    def label(self) -> str:
        return self.path.stem

    # ------------------------------------------------------------ per-round reads

    def resolve_round(self, round_index: int | None) -> int:
        """A completed round index; None is the last one and negative values count from the end."""
        if not self.round_indices:
            raise LogError(f"log '{self.path}' holds no completed round yet: wait for round 0 to finish")
        if round_index is None:
            return self.round_indices[-1]
        round_index = int(round_index)
        if round_index < 0 and -round_index <= len(self.round_indices):
            return self.round_indices[round_index]
        if round_index not in self.round_indices:
            first, last = self.round_indices[0], self.round_indices[-1]
            raise LogError(f"round {round_index} is not in log '{self.path}' (completed rounds: {first}..{last}): "
                           "pick one of those, or -1 for the last")
        return round_index

    def _module(self, module: str) -> str:
        if module not in self.module_shapes:
            shown = ", ".join(self.modules[:3]) + (", ..." if len(self.modules) > 3 else "")
            raise LogError(f"module '{module}' is not adapted in log '{self.path}': use one of run.modules ({shown})")
        return module

    def clients(self, round_index: int | None = None) -> pd.DataFrame:
        """The round's `clients/` datasets, one row per sampled client, plus `excluded`,
        `excluded_reason` and the aggregation weight `weight` (p_k; 0 for excluded clients)."""
        r = self.resolve_round(round_index)
        with _reading(self.path) as handle:
            group = handle["rounds"][storage.round_key(r)]["clients"]
            data = {key: group[key][()] for key in group.keys() if key not in ("excluded", "excluded_reason")}
            excluded = group["excluded"][()].tolist() if "excluded" in group else []
            reasons = ([storage.decode_str(x) for x in group["excluded_reason"][()]]
                       if "excluded_reason" in group else [""] * len(excluded))
        ordered = ["id", "num_samples", "rank", "train_loss"]
        columns = [k for k in ordered if k in data] + sorted(k for k in data if k not in ordered)
        frame = pd.DataFrame({k: data[k] for k in columns})
        why = dict(zip(excluded, reasons))
        ids = frame["id"].tolist() if "id" in frame else []
        frame["excluded"] = np.array([cid in why for cid in ids], dtype=bool)
        frame["excluded_reason"] = pd.Series([why.get(cid, "") for cid in ids], dtype=object)
        if "num_samples" in frame:
            kept = np.where(frame["excluded"], 0.0, frame["num_samples"].astype(np.float64))
            total = kept.sum()
            frame["weight"] = kept / total if total > 0 else kept
        return frame

    def aggregation_weights(self, round_index: int | None = None) -> dict[int, int]:
        """Client id -> n_k for the clients aggregated in the round (sampled minus excluded), by id."""
        frame = self.clients(round_index)
        kept = frame[~frame["excluded"]]
        return {int(c): int(n) for c, n in sorted(zip(kept["id"], kept["num_samples"]))}

    def spectrum(self, round_index: int | None, module: str) -> np.ndarray:
        """The singular values the module's global rank was chosen from (float64, descending)."""
        r, module = self.resolve_round(round_index), self._module(module)
        with _reading(self.path) as handle:
            return np.asarray(handle["rounds"][storage.round_key(r)]["global"][module]["singular_values"][()],
                              dtype=np.float64)

    def spectra(self, round_index: int | None = None) -> dict[str, np.ndarray]:
        """Every module's spectrum for one round, in module order (one file open)."""
        r = self.resolve_round(round_index)
        with _reading(self.path) as handle:
            group = handle["rounds"][storage.round_key(r)]["global"]
            return {m: np.asarray(group[m]["singular_values"][()], dtype=np.float64) for m in self.modules}

    def global_factors(self, round_index: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Module -> (B, A) float32 global factors of the round; B @ A is the ΔW merged that round."""
        r = self.resolve_round(round_index)
        with _reading(self.path) as handle:
            group = handle["rounds"][storage.round_key(r)]["global"]
            return {m: (group[m]["B"][()], group[m]["A"][()]) for m in self.modules}

    def residual_factors(self, round_index: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Module -> (m×q, q×n) float32 residual merged into the base that round (FedEx-LoRA); {} otherwise."""
        r = self.resolve_round(round_index)
        with _reading(self.path) as handle:
            return storage.read_residual_factors(handle, r)

    def has_client_adapters(self, round_index: int | None = None) -> bool:
        r = self.resolve_round(round_index)
        with _reading(self.path) as handle:
            return "client_adapters" in handle["rounds"][storage.round_key(r)]

    def client_adapters(self, round_index: int | None = None) -> dict[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """Client id -> module -> (B, A): each aggregated client's effective factors (scaling folded in).

        Raises LogError when the run did not log them (log.client_adapters was false).
        """
        r = self.resolve_round(round_index)
        with _reading(self.path) as handle:
            group = handle["rounds"][storage.round_key(r)]
            if "client_adapters" not in group:
                raise LogError(f"log '{self.path}' has no client adapters for round {r}: {CLIENT_ADAPTERS_HINT}")
            adapters = group["client_adapters"]
            result = {}
            for key in sorted(adapters.keys(), key=int):
                client = adapters[key]
                result[int(key)] = {m: (client[m]["B"][()], client[m]["A"][()]) for m in self.modules if m in client}
            return result

    def __repr__(self) -> str:
        return (f"Run('{self.path}', method={self.method}, tau={self.tau}, clients={self.num_clients}, "
                f"rounds={len(self.round_indices)}, modules={len(self.modules)})")


# ------------------------------------------------- output folders of sweep-tau and export


def check_new_output_dir(path: Path, what: str, fix: str = "choose a new directory") -> Path:
    """`path` if nothing would be overwritten there: absent, or an empty directory.

    `what` names the folder in the message (e.g. "--out 'x'"), `fix` says what to do instead.
    """
    from florist_mpi.errors import UserError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} is a file, not a directory: {fix}")
    if path.is_dir() and any(path.iterdir()):
        raise UserError(f"{what} already exists and is not an empty directory (nothing was overwritten): {fix}")
    return path


@contextmanager
def publishing_dir(path: Path):
    """Yield a scratch directory beside `path` that becomes `path` only if the block succeeds,
    so an interrupted or failed command leaves no half-written folder."""
    from florist_mpi.errors import UserError

    path = Path(path)
    scratch = path.with_name(f".{path.name}.partial")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        scratch.mkdir(parents=True)
    except OSError as err:
        raise UserError(f"cannot create '{path}' ({err.strerror}): choose a writable location") from None
    try:
        yield scratch
        check_new_output_dir(path, f"'{path}'")  # something appeared meanwhile: do not clobber it
        if path.exists():
            path.rmdir()
        scratch.rename(path)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
