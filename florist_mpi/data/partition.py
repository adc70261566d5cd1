"""Splitting one file's records over clients: IID, or non-IID by a Dirichlet over categories."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from florist_mpi.data.common import DataError, DataStream, data_rng


def iid_partition(num_records: int, num_clients: int, seed: int) -> list[list[int]]:
    """Record indices per client: a seeded shuffle split into near-equal parts."""
    order = data_rng(seed, DataStream.PARTITION).permutation(num_records)
    return [sorted(int(i) for i in part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(categories: list[str], num_clients: int, alpha: float, seed: int) -> list[list[int]]:
    """Record indices per client: each category's records split by proportions ~ Dirichlet(alpha).

    Small alpha concentrates a category on few clients (non-IID). Clients left empty get
    one record from the largest client, so every client trains whenever possible.
    """
    rng = data_rng(seed, DataStream.PARTITION)
    by_category: dict[str, list[int]] = {}
    for index, category in enumerate(categories):
        by_category.setdefault(category, []).append(index)
    groups: list[list[int]] = [[] for _ in range(num_clients)]
    for category in sorted(by_category):  # sorted: independent of the file's category order
        indices = rng.permutation(by_category[category])
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
        for client, part in enumerate(np.split(indices, cuts)):
            groups[client].extend(int(i) for i in part)
    _fill_empty_clients(groups)
    return [sorted(group) for group in groups]


def _fill_empty_clients(groups: list[list[int]]) -> None:
    for group in groups:
        if group:
            continue
        donor = max(groups, key=len)  # first of the largest: deterministic
        if len(donor) < 2:
            return  # fewer records than clients: reported by the caller
        group.append(donor.pop())


def require_nonempty_clients(groups: list[list[int]], path: Path) -> None:
    total = sum(map(len, groups))
    for client, group in enumerate(groups):
        if not group:
            raise DataError(
                f"client {client} gets no examples: '{path}' has {total} records for {len(groups)} clients; "
                "add records or lower federation.num_clients"
            )
