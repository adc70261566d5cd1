#!/usr/bin/env bash
# Summarise a scaling study (jobs/scaling_study.sbatch) with `florist-mpi report --scaling`:
# strong-scaling speed-up and efficiency, weak-scaling efficiency, load imbalance, memory per
# rank, phase shares and traffic per round, as text, CSV, JSON and plots.
#
#   jobs/scaling_report.sh                           # reads runs/scaling/*.h5
#   SCALING_DIR=runs/scaling_v2 jobs/scaling_report.sh
#   SKIP_FIRST_ROUND=1 jobs/scaling_report.sh        # leave each log's first round (warm-up) out
#   # or as a job that starts when the whole array has succeeded:
#   array=$(sbatch --parsable --array=0-5 jobs/scaling_study.sbatch configs/demo.yaml)
#   sbatch --dependency=afterok:$array jobs/scaling_report.sh
#
# Writes to SCALING_DIR: scaling.txt (the text, also printed), scaling.csv (one row per log),
# scaling.json (per log and per point), rounds.csv (plain `report --csv`: one row per log and round)
# and plots/scaling_*.png. Logs that are not one study (another config key differs) end the
# report with one line naming the key, exit code 2.
#
# Output (as a job): florist-scaling-report-<job id>.out in the submission directory.
#SBATCH --job-name=florist-scaling-report
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --output=%x-%j.out
set -euo pipefail

SCALING_DIR=${SCALING_DIR:-runs/scaling}
VENV=${VENV:-.venv}
SKIP_FIRST_ROUND=${SKIP_FIRST_ROUND:-0}

if [[ -x "$VENV/bin/florist-mpi" ]]; then
  export PATH="$VENV/bin:$PATH"
fi

shopt -s nullglob
logs=("$SCALING_DIR"/*.h5)
if (( ${#logs[@]} == 0 )); then
  echo "no logs in $SCALING_DIR/*.h5: run jobs/scaling_study.sbatch first (or set SCALING_DIR)" >&2
  exit 2
fi
skip=""  # unquoted below: nothing, or the one flag (an empty array would trip `set -u` in bash < 4.4)
if [[ "$SKIP_FIRST_ROUND" == 1 ]]; then
  skip=--skip-first-round
fi

florist-mpi report --scaling $skip "${logs[@]}" > "$SCALING_DIR/scaling.txt"
florist-mpi report --scaling $skip "${logs[@]}" --csv > "$SCALING_DIR/scaling.csv"
florist-mpi report --scaling $skip "${logs[@]}" --json --plots "$SCALING_DIR/plots" > "$SCALING_DIR/scaling.json"
florist-mpi report "${logs[@]}" --csv > "$SCALING_DIR/rounds.csv"
cat "$SCALING_DIR/scaling.txt"
echo "wrote $SCALING_DIR/scaling.txt, scaling.csv, scaling.json, rounds.csv and plots/ (${#logs[@]} logs)"
