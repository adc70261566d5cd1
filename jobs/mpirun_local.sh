#!/usr/bin/env bash
# A florist-mpi run on this machine with mpiexec (no Slurm): a laptop, a workstation,
# one interactive node.
#
#   jobs/mpirun_local.sh                                   # 4 ranks, configs/demo.yaml
#   NP=2 CONFIG=configs/demo.yaml jobs/mpirun_local.sh --set run.rounds=2 --overwrite
#   MPI_ROOT_FLAGS=1 jobs/mpirun_local.sh                  # force the root/oversubscribe flags
#
# Extra arguments go to `florist-mpi run` (--set key=value, --resume, --overwrite, --verbose).
#
# Variables (all optional):
#   NP              MPI ranks (default 4); more ranks than cores works, just slower
#   CONFIG          experiment YAML (default configs/demo.yaml)
#   VENV            virtual environment whose bin/ goes first on PATH (default .venv)
#   MPIEXEC         launcher (default: VENV's mpiexec if present, else mpiexec on PATH)
#   MPI_ROOT_FLAGS  auto (default): add Open MPI's --allow-run-as-root --oversubscribe
#                   only when running as root (containers, CI); 1: always; 0: never
#   MPIEXEC_FLAGS   any further launcher flags, e.g. "--bind-to none"
#   OMP_NUM_THREADS threads per rank (default: this machine's cores / NP, at least 1)
set -euo pipefail

NP=${NP:-4}
CONFIG=${CONFIG:-configs/demo.yaml}
VENV=${VENV:-.venv}
MPI_ROOT_FLAGS=${MPI_ROOT_FLAGS:-auto}
MPIEXEC_FLAGS=${MPIEXEC_FLAGS:-}

if [[ -x "$VENV/bin/florist-mpi" ]]; then
  export PATH="$VENV/bin:$PATH"
fi
MPIEXEC=${MPIEXEC:-mpiexec}

flags=()
if [[ "$MPI_ROOT_FLAGS" == 1 || ( "$MPI_ROOT_FLAGS" == auto && "$(id -u)" == 0 ) ]]; then
  # Open MPI refuses to run as root without consent, and counts slots strictly.
  flags+=(--allow-run-as-root --oversubscribe)
fi
if [[ -n "$MPIEXEC_FLAGS" ]]; then
  read -r -a extra_flags <<< "$MPIEXEC_FLAGS"
  flags+=("${extra_flags[@]}")
fi
# Threads: an even share of the cores per rank, unless OMP_NUM_THREADS is set. florist-mpi sizes each
# rank's torch thread pool from it; OpenMP and MKL read it before that (ranks inherit the environment).
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
  OMP_NUM_THREADS=$(( cores / NP > 0 ? cores / NP : 1 ))
fi
export OMP_NUM_THREADS

echo "OMP_NUM_THREADS=$OMP_NUM_THREADS $MPIEXEC ${flags[*]} -n $NP florist-mpi run $CONFIG $*"
exec "$MPIEXEC" "${flags[@]}" -n "$NP" florist-mpi run "$CONFIG" "$@"
