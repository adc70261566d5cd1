"""Which config keys must match between a log and the config that resumes it."""
from __future__ import annotations

from florist_mpi.config.experiment import ExperimentConfig

RESUME_KEYS = (
    "run.seed",
    "federation.num_clients",
    "federation.clients_per_round",
    "federation.method",
    "federation.tau",
    "federation.max_rank",
    "federation.dropout",
    "model",
    "lora",
    "data",
    "train",
    # what the logged eval metric means (eval.every and eval.batch_size may change)
    "eval.kind",
    "eval.path",
    "eval.max_examples",
    # the simulated clock: its figures accumulate over rounds (sim_clock_s)
    "federation.overcommit",
    "system",
)


def _lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _first_difference(a, b, prefix: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            found = _first_difference(a.get(key), b.get(key), f"{prefix}.{key}")
            if found:
                return found
        return None
    return None if a == b else prefix


# Keys inside RESUME_KEYS that may change on resume: they choose how, not what, is computed.
RESUME_FREE = (
    "train.client_engines",  # reused and fresh engines give bitwise-equal clients (tests/test_training.py)
    "train.client_batch",  # grouped clients get what one-at-a-time training gives (tests/test_client_batch.py)
)


def resume_mismatch(logged: ExperimentConfig, current: ExperimentConfig) -> str | None:
    """The first key (dotted) whose value differs in a way that forbids resuming."""
    old, new = logged.model_dump(mode="json"), current.model_dump(mode="json")
    for tree in (old, new):
        for dotted in RESUME_FREE:
            section, _, key = dotted.rpartition(".")
            node = _lookup(tree, section)
            if isinstance(node, dict):
                node.pop(key, None)
    for key in RESUME_KEYS:
        diff = _first_difference(_lookup(old, key), _lookup(new, key), key)
        if diff:
            return diff
    return None
