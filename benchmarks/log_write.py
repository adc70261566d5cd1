"""Log write time per round vs round number: the format-1 single file vs the format-2 split log.

    python benchmarks/log_write.py [--rounds 24] [--mb 11] [--modules 16] [--clients 8] [--dir DIR]

Both logs receive the same synthetic rounds, written alternately in one process so that
both see the same disk and page-cache conditions:

(a) old: `storage.legacy_create_log` + `append_round` on a single file, i.e. the
    format-1 writer: copy the whole log beside itself, add the round, fsync, rename;
(b) new: `storage.create_log` + `append_round` on a split log: write the round's own
    file, fsync, rename, then add its link to the small log file (copy, fsync, rename);
(c) floor: the round appended in place to one open-and-close HDF5 file, then fsync: the
    least any layout can do, but not crash-safe (docs/crash-safety.md), so not an option.

A round holds `--modules` modules of global factors (rank 16) plus the client adapters of
`--clients` clients, sized so that the round is about `--mb` MB. Prints write time per
round for both, the medians of the first and last 4 rounds and their ratio, and the sizes.
The files go to a temporary folder under --dir (default: the system's), deleted afterwards.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from florist_mpi import storage

GLOBAL_RANK = 16
CLIENT_RANK = 8


def synthetic_round(index: int, modules: list[str], dim: int, clients: int) -> storage.RoundRecord:
    g = np.random.default_rng(index)
    global_factors = {
        m: (
            g.standard_normal((dim, GLOBAL_RANK), dtype=np.float32),
            g.standard_normal((GLOBAL_RANK, dim), dtype=np.float32),
            np.linspace(1, 0, GLOBAL_RANK),
            GLOBAL_RANK,
            0.9,
        )
        for m in modules
    }
    adapters = {
        c: {
            m: (
                g.standard_normal((dim, CLIENT_RANK), dtype=np.float32),
                g.standard_normal((CLIENT_RANK, dim), dtype=np.float32),
            )
            for m in modules
        }
        for c in range(clients)
    }
    return storage.RoundRecord(
        index=index,
        attrs={"eval_loss": 1.0, "bytes_up": 0, "bytes_down": 0},
        clients={"id": np.arange(clients), "num_samples": np.full(clients, 10)},
        excluded=[],
        global_factors=global_factors,
        client_adapters=adapters,
    )


def append_in_place(path: Path, header: storage.RunHeader, record: storage.RoundRecord) -> None:
    """(c): the round written straight into the one file (no copy, no rename), then fsync."""
    with h5py.File(path, "a") as handle:
        if record.index == 0:
            storage._write_header(handle, header)
        group = handle.require_group("rounds").create_group(storage.round_key(record.index))
        storage._write_round(group, record)
        for module, factors in storage._client_modules(record.client_adapters):
            storage._write_client_module(group, module, factors)
    storage._fsync_file(path)


def dim_for(mb: float, modules: int, clients: int) -> int:
    """Square modules (dim x dim) whose factors add up to about `mb` MB a round."""
    floats_per_dim = modules * 2 * (GLOBAL_RANK + clients * CLIENT_RANK)  # B and A: r * (m + n) = 2 r dim
    return max(8, int(mb * 1e6 / 4 / floats_per_dim))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--mb", type=float, default=11.0, help="data per round (MB)")
    parser.add_argument("--modules", type=int, default=16)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--dir", default=None, help="where to write (a file system you care about)")
    args = parser.parse_args()

    modules = [f"model.layers.{i // 4}.proj{i % 4}" for i in range(args.modules)]
    dim = dim_for(args.mb, args.modules, args.clients)
    header = storage.RunHeader(
        config_yaml="run: {}\n",
        method="florist",
        tau=0.9,
        num_clients=args.clients,
        world_size=1,
        created="bench",
        versions={},
        modules=modules,
        module_shapes=[(dim, dim)] * len(modules),
    )
    times = {"old": [], "new": [], "floor": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        paths = {layout: Path(tmp) / f"{layout}.h5" for layout in times}
        for r in range(args.rounds):
            record = synthetic_round(r, modules, dim, args.clients)
            for layout in times:
                start = time.perf_counter()
                if layout == "floor":
                    append_in_place(paths[layout], header, record)
                elif r == 0 and layout == "old":
                    storage.legacy_create_log(paths[layout], header, record)
                elif r == 0:
                    storage.create_log(paths[layout], header, first_round=record)
                else:
                    storage.append_round(paths[layout], record)
                times[layout].append(time.perf_counter() - start)
        round_mb = sum(p.stat().st_size for p in storage.rounds_folder(paths["new"]).iterdir()) / args.rounds / 1e6
        old_mb = paths["old"].stat().st_size / 1e6
        index_kb = paths["new"].stat().st_size / 1e3

    print(
        f"{args.rounds} rounds of {round_mb:.1f} MB ({args.modules} modules {dim}x{dim}, global rank {GLOBAL_RANK}, "
        f"{args.clients} clients of rank {CLIENT_RANK}); old log {old_mb:.0f} MB, "
        f"new log file {index_kb:.0f} kB + folder"
    )
    print("| round | old: single file, copy per round (s) | new: round file + link (s) | floor: in place, unsafe (s) |")
    print("| ---: | ---: | ---: | ---: |")
    for r in range(args.rounds):
        print(f"| {r + 1} | {times['old'][r]:.3f} | {times['new'][r]:.3f} | {times['floor'][r]:.3f} |")
    k = min(4, args.rounds // 2)
    for layout in times:
        first, last = statistics.median(times[layout][:k]), statistics.median(times[layout][-k:])
        print(
            f"{layout}: median of the first {k} rounds {first:.3f} s, of the last {k} {last:.3f} s, "
            f"ratio {last / first:.2f}"
        )


if __name__ == "__main__":
    main()
