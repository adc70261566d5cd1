"""Generated instruction data: small algorithmic tasks (reverse, sort, add, ...) that a tiny randomly
initialised model learns within a few dozen steps. Each client's task mix is drawn from a Dirichlet
distribution, which makes the federation non-IID the way category splits of real instruction data do.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from florist_mpi.config import SyntheticDataConfig
from florist_mpi.data.common import DataError, DataStream, data_rng

WORDS = (
    "cat dog sun moon tree fish bird star rain snow leaf rock milk bread apple lamp "
    "door book ship road king frog wolf bear cake rose wind fire gold salt seed hill"
).split()


def _words(rng: np.random.Generator, low: int, high: int) -> list[str]:
    return [WORDS[i] for i in rng.integers(0, len(WORDS), size=int(rng.integers(low, high + 1)))]


def _reverse(rng):
    words = _words(rng, 3, 6)
    return "Reverse the order of the words.", " ".join(words), " ".join(reversed(words))


def _sort(rng):
    numbers = [int(n) for n in rng.integers(0, 100, size=int(rng.integers(3, 7)))]
    return (
        "Sort the numbers from smallest to largest.",
        " ".join(map(str, numbers)),
        " ".join(map(str, sorted(numbers))),
    )


def _add(rng):
    a, b = (int(n) for n in rng.integers(0, 50, size=2))
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


def _copy(rng):
    text = " ".join(_words(rng, 3, 6))
    return "Copy the text exactly.", text, text


def _count(rng):
    words = _words(rng, 1, 9)
    return "Count the words in the list.", " ".join(words), str(len(words))


def _upper(rng):
    word = WORDS[int(rng.integers(0, len(WORDS)))]
    return "Write the word in capital letters.", word, word.upper()


# Each task has one fixed instruction, so the instruction alone tells the model the task.
TASKS: dict[str, Callable[[np.random.Generator], tuple[str, str, str]]] = {
    "reverse": _reverse,
    "sort": _sort,
    "add": _add,
    "copy": _copy,
    "count": _count,
    "upper": _upper,
}


def _task_generators(tasks: list[str]) -> list[Callable]:
    unknown = [name for name in tasks if name not in TASKS]
    if unknown or not tasks:
        what = f"unknown task(s) {', '.join(map(repr, unknown))}" if unknown else "no tasks"
        raise DataError(f"data.synthetic.tasks has {what}: choose from {', '.join(TASKS)}")
    return [TASKS[name] for name in tasks]


def _synthetic_record(task: str, generator: Callable, rng: np.random.Generator) -> dict:
    instruction, context, response = generator(rng)
    return {"instruction": instruction, "context": context, "response": response, "category": task}


def synthetic_client_records(cfg: SyntheticDataConfig, client_id: int, seed: int) -> list[dict]:
    """One client's examples; its task mix ~ Dirichlet(concentration) (small = non-IID)."""
    generators = _task_generators(cfg.tasks)
    rng = data_rng(seed, client_id, DataStream.SYNTHETIC_CLIENT)
    mix = rng.dirichlet(np.full(len(generators), cfg.concentration))
    picks = rng.choice(len(generators), size=cfg.examples_per_client, p=mix)
    return [_synthetic_record(cfg.tasks[t], generators[t], rng) for t in picks]


def synthetic_eval_records(cfg: SyntheticDataConfig, seed: int) -> list[dict]:
    """Held-out examples cycling through the tasks, so any prefix is a balanced mix."""
    generators = _task_generators(cfg.tasks)
    rng = data_rng(seed, DataStream.SYNTHETIC_EVAL)
    count = len(generators)
    return [_synthetic_record(cfg.tasks[i % count], generators[i % count], rng) for i in range(cfg.eval_examples)]
