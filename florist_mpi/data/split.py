"""Every client's training records (the federated split), the held-out records, and the share set
aside for the tiny base model's warm-up.

Per-client data (generated, or one file per client) belongs to its client; a single file is
partitioned over the clients (data.partition). Pure functions of (config, number of clients, run
seed), so each MPI rank computes the same split without communicating.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from florist_mpi.config import DataConfig
from florist_mpi.data.common import DataStream, SetAside, data_rng
from florist_mpi.data.files import client_files, eval_path, load_json_records
from florist_mpi.data.partition import dirichlet_partition, iid_partition, require_nonempty_clients
from florist_mpi.data.synthetic import synthetic_client_records, synthetic_eval_records


def client_records(cfg: DataConfig, num_clients: int, seed: int) -> list[list[dict]]:
    """Training records of every client, index = client id; deterministic in the arguments only."""
    return split_records(cfg, num_clients, seed)[0]


class ClientData(Sequence):
    """Every client's training records (index = client id), as a run reads them.

    Files are read at once (a partition needs every record); generated clients are made when
    first asked for, each from (seed, client) alone, and forgotten again, so a run with 100,000
    registered clients that samples 1,000 per round generates what it samples, and start-up does
    not grow with the registered clients. Either way `data[k]` is what `split_records` gives
    client k, and `num_records(k)` its count (for generated clients, without generating them).
    """

    def __init__(self, cfg: DataConfig, num_clients: int, seed: int, set_aside: SetAside | None = None):
        self.cfg, self.num_clients, self.seed, self.set_aside = cfg, num_clients, seed, set_aside
        self._loaded = None if cfg.source == "synthetic" else split_records(cfg, num_clients, seed, set_aside)[0]

    def __len__(self) -> int:
        return self.num_clients

    def __getitem__(self, client):
        if isinstance(client, slice):
            return [self[k] for k in range(*client.indices(self.num_clients))]
        if not -self.num_clients <= client < self.num_clients:
            raise IndexError(f"client {client} is not one of the {self.num_clients} clients")
        client %= self.num_clients
        if self._loaded is not None:
            return self._loaded[client]
        records = synthetic_client_records(self.cfg.synthetic, client, self.seed)
        return _set_aside_per_client([records], self.set_aside, first_client=client)[0][0]

    def num_records(self, client: int) -> int:
        """Training records of one client (after the set-aside)."""
        if self._loaded is not None:
            return len(self._loaded[client])
        count = self.cfg.synthetic.examples_per_client
        if self.set_aside is None:
            return count
        return count - _set_aside_count(count, self.set_aside.fraction)

    @property
    def generated(self) -> bool:
        """True when clients are made on demand (no file to check: every client has records)."""
        return self._loaded is None


def split_records(
    cfg: DataConfig, num_clients: int, seed: int, set_aside: SetAside | None = None
) -> tuple[list[list[dict]], list[dict]]:
    """(every client's training records, the records set aside from them: empty without `set_aside`).

    Per-client data (files, generated) loses `fraction` of every client's records, at most all
    but one; a single file to partition loses `fraction` of its records before the partition.
    """
    if cfg.source == "synthetic":
        clients = [synthetic_client_records(cfg.synthetic, client, seed) for client in range(num_clients)]
        return _set_aside_per_client(clients, set_aside)
    path = Path(cfg.path)
    if cfg.partition == "files":
        clients = client_files(path, cfg.client_pattern, num_clients, cfg.category_field)
        return _set_aside_per_client(clients, set_aside)
    records = load_json_records(path, cfg.category_field)
    reserved: list[dict] = []
    if set_aside is not None:
        rng = data_rng(set_aside.seed, DataStream.SET_ASIDE)
        keep, aside = _set_aside_indices(len(records), set_aside.fraction, rng)
        records, reserved = [records[i] for i in keep], [records[i] for i in aside]
    return _partition(cfg, records, num_clients, seed, path), reserved


def _set_aside_count(count: int, fraction: float) -> int:
    """Records set aside of `count`: floor(count · fraction), at most count - 1, so something is kept."""
    return max(0, min(count - 1, math.floor(count * fraction + 1e-9)))


def _set_aside_indices(count: int, fraction: float, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(kept, set-aside) indices in record order; at most count - 1 set aside, so something is kept."""
    order = rng.permutation(count)
    cut = _set_aside_count(count, fraction)
    return sorted(int(i) for i in order[cut:]), sorted(int(i) for i in order[:cut])


def _set_aside_per_client(
    clients: list[list[dict]], set_aside: SetAside | None, first_client: int = 0
) -> tuple[list[list[dict]], list[dict]]:
    """Each client's share set aside, from (set-aside seed, client) alone; clients[i] is client first_client + i."""
    if set_aside is None:
        return clients, []
    kept_clients, reserved = [], []
    for client, records in enumerate(clients, start=first_client):
        rng = data_rng(set_aside.seed, DataStream.SET_ASIDE, client + 1)
        keep, aside = _set_aside_indices(len(records), set_aside.fraction, rng)
        kept_clients.append([records[i] for i in keep])
        reserved.extend(records[i] for i in aside)
    return kept_clients, reserved


def _partition(cfg: DataConfig, records: list[dict], num_clients: int, seed: int, path: Path) -> list[list[dict]]:
    if cfg.partition == "iid":
        groups = iid_partition(len(records), num_clients, seed)
    else:
        categories = [record["category"] for record in records]
        groups = dirichlet_partition(categories, num_clients, cfg.dirichlet_alpha, seed)
    require_nonempty_clients(groups, path)
    return [[records[i] for i in indices] for indices in groups]


def eval_records(cfg: DataConfig, seed: int) -> list[dict]:
    """Held-out records: a balanced synthetic task mix, or the json held-out file."""
    if cfg.source == "synthetic":
        return synthetic_eval_records(cfg.synthetic, seed)
    return load_json_records(eval_path(cfg), cfg.category_field)


def epochs_to_batches(num_examples: int, batch_size: int, epochs: float) -> int:
    """Batches needed to see `num_examples` `epochs` times; at least one."""
    # The epsilon keeps float noise (100 * 0.3 = 30.000000000000004) from adding a batch.
    return max(1, math.ceil(num_examples * epochs / batch_size - 1e-9))
