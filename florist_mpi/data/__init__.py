"""Instruction data: loading, federated splits, the local tokenizer, encoding, batching.

Records are Dolly-style dicts with string fields `instruction`, `context`, `response` and
`category`. Every split and every generated example is a pure function of (config, number
of clients, run seed), so each MPI rank computes the same data without communicating.

One module per role:
  common     the package's error, its random streams, the warm-up's set-aside share
  synthetic  the offline default (`data.source: synthetic`): generated algorithmic tasks
  files      JSON / JSON Lines records, per-client files, the held-out file
  partition  IID and Dirichlet (non-IID) splits of one file
  split      every client's training records (`ClientData`), held-out records, set-aside
  text       the prompt template and the local BPE tokenizer
  encoding   (input ids, labels) pairs, padding, the seeded micro-batch plan
  profiles   per-client device and link profiles from CSV (the simulated clock)
"""
from florist_mpi.data.common import DataError, DataStream, SetAside, data_rng
from florist_mpi.data.encoding import (
    IGNORE_INDEX,
    collate,
    encode_pair,
    encode_records,
    encode_texts,
    plain_prompt,
    sample_batches,
    special_ids,
)
from florist_mpi.data.files import DEFAULT_CATEGORY, EVAL_FILE_NAME, client_files, eval_path, load_json_records
from florist_mpi.data.partition import dirichlet_partition, iid_partition, require_nonempty_clients
from florist_mpi.data.profiles import system_tables
from florist_mpi.data.split import ClientData, client_records, epochs_to_batches, eval_records, split_records
from florist_mpi.data.synthetic import TASKS, synthetic_client_records, synthetic_eval_records
from florist_mpi.data.text import (
    SPECIAL_TOKENS,
    build_tokenizer,
    format_example,
    format_prompt,
    load_tokenizer,
    save_tokenizer,
)

__all__ = [
    "DEFAULT_CATEGORY", "EVAL_FILE_NAME", "IGNORE_INDEX", "SPECIAL_TOKENS", "TASKS", "ClientData", "DataError",
    "DataStream", "SetAside", "build_tokenizer", "client_files", "client_records", "collate", "data_rng",
    "dirichlet_partition", "encode_pair", "encode_records", "encode_texts", "epochs_to_batches", "eval_path",
    "eval_records", "format_example", "format_prompt", "iid_partition", "load_json_records", "load_tokenizer",
    "plain_prompt", "require_nonempty_clients", "sample_batches", "save_tokenizer", "special_ids", "split_records",
    "synthetic_client_records", "synthetic_eval_records", "system_tables",
]
