#!/usr/bin/env bash
# Summarise a scaling study (jobs/scaling_study.sbatch): per-round rows of every run as
# CSV, a text summary with the comparison table, and the plots.
#
#   jobs/scaling_report.sh                 # reads runs/scaling/*.h5
#   SCALING_DIR=runs/scaling_v2 jobs/scaling_report.sh
#   # or as a job that starts when the whole array has ended:
#   array=$(sbatch --parsable --array=0-5 jobs/scaling_study.sbatch configs/demo.yaml)
#   sbatch --dependency=afterany:$array jobs/scaling_report.sh
#
# Writes SCALING_DIR/summary.csv (one row per run and round, with run, world_size and
# total_clients columns), SCALING_DIR/summary.txt and SCALING_DIR/plots/*.png.
#SBATCH --job-name=florist-scaling-report
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
#SBATCH --output=florist-%x-%j.out
set -euo pipefail

SCALING_DIR=${SCALING_DIR:-runs/scaling}
VENV=${VENV:-.venv}

if [[ -x "$VENV/bin/florist-mpi" ]]; then
  export PATH="$VENV/bin:$PATH"
fi

shopt -s nullglob
logs=("$SCALING_DIR"/*.h5)
if (( ${#logs[@]} == 0 )); then
  echo "no logs in $SCALING_DIR/*.h5: run jobs/scaling_study.sbatch first (or set SCALING_DIR)" >&2
  exit 2
fi

florist-mpi report "${logs[@]}" --plots "$SCALING_DIR/plots" --csv > "$SCALING_DIR/summary.csv"
florist-mpi report "${logs[@]}" > "$SCALING_DIR/summary.txt"
echo "wrote $SCALING_DIR/summary.csv, $SCALING_DIR/summary.txt and $SCALING_DIR/plots/ (${#logs[@]} runs)"
