"""Reused client engines give bitwise the results of fresh ones, and leak nothing between clients."""
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, mpi_env

from florist_mpi.config import ConfigError, config_from_tree
from florist_mpi.training import engines_reusable


@pytest.mark.parametrize("variant", ["plain", "ffa", "flexlora", "bf16base"])
def test_reused_engines_equal_fresh_ones_bitwise(tmp_path, variant):
    """Each job runs twice: on the rank's reused adapter/engine and on a fresh PEFT wrapper and
    engine on a bitwise-equal base (the pre-existing path). Client 0 comes back after clients of its
    own and of another LoRA rank, so leftover optimizer moments, LoRA weights, gradients or RNG state
    would show. LoRA dropout and gradient accumulation are on."""
    out = tmp_path / "factors.npz"
    result = subprocess.run([sys.executable, str(REPO / "tests/scripts/client_engines.py"), str(out), variant],
                            capture_output=True, text=True, timeout=300, cwd=REPO, env=mpi_env())
    assert result.returncode == 0, result.stderr[-3000:]
    saved = np.load(out)
    reused = [key for key in saved.files if key.startswith("reused/")]
    assert len(reused) == 6 * (3 * 2 + 1)  # 6 jobs x (3 modules x B, A + loss)
    for key in reused:
        assert np.array_equal(saved[key], saved["fresh/" + key.removeprefix("reused/")]), key
    # the same client in two rounds trained different data orders from different seeds
    assert not np.array_equal(saved["reused/0/0/model.layers.0.self_attn.q_proj/B"],
                              saved["reused/0/1/model.layers.0.self_attn.q_proj/B"])
    # between clients the adapters are off: the base model computes exactly what it did before
    assert np.array_equal(saved["logits/before"], saved["logits/after"])
    assert np.array_equal(saved["weights/reused"], saved["weights/fresh"])


def _train(**values):
    base = {"run": {}, "federation": {"num_clients": 2}, "train": values}
    return config_from_tree(base).train


def test_engines_are_reused_only_where_deepspeed_trains_the_weights_in_place():
    import torch

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert engines_reusable(_train(), cpu) and engines_reusable(_train(), gpu)
    assert not engines_reusable(_train(zero_stage=1), cpu)
    assert not engines_reusable(_train(precision="bf16"), gpu)  # DeepSpeed's bf16 optimizer keeps fp32 copies
    assert engines_reusable(_train(precision="bf16"), cpu)  # CPU engines train in fp32
    assert not engines_reusable(_train(client_engines="fresh"), cpu)
    with pytest.raises(ConfigError, match="client_engines"):
        _train(client_engines="reuse", zero_stage=2)


def test_extension_builds_use_the_ninja_beside_the_interpreter(tmp_path, monkeypatch):
    """Whatever the PATH, torch's op builds run the environment's own ninja (two ninja versions alternating
    rebuild the op at every start-up), and the PATH is given back afterwards."""
    import os
    import shutil

    from florist_mpi import training

    bin_dir = tmp_path / "env" / "bin"
    bin_dir.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with training._ninja_beside_python():  # no ninja there: the PATH stays as it is
        assert os.environ["PATH"] == "/usr/bin:/bin"
    (bin_dir / "ninja").write_text("#!/bin/sh\n")
    (bin_dir / "ninja").chmod(0o755)
    with training._ninja_beside_python():
        assert shutil.which("ninja") == str(bin_dir / "ninja")
    assert os.environ["PATH"] == "/usr/bin:/bin"
