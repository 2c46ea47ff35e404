#!/usr/bin/env bash
# Evaluate on a SLURM allocation (docs/cluster.md):
#
#   sbatch [sbatch options] slurm/eval.sh --model DIR_OR_URL [--model ...] --benchmarks ... --n 32 --out DIR
#
# The arguments are python -m scope_ds.evaluate's. On GPU nodes every --model folder gets one SGLang
# server, started here as a job step on its share of the GPUs (--dp-size replicas of
# SCOPE_DS_EVAL_TP GPUs each), and the evaluator is given its URL; on CPU nodes the evaluator starts
# the embedded server itself. Its output goes to the job's output file; server logs to OUT/logs.
#SBATCH --job-name=scope_ds-eval
set -euo pipefail

# sbatch runs a copy of this file from its spool folder: find the checkout through the job's Command.
: "${SCOPE_DS_ROOT:=$(cd "$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")/.." && pwd)}"
export SCOPE_DS_ROOT
source "$SCOPE_DS_ROOT/slurm/common.sh"

if [ $# -lt 1 ]; then
  echo "usage: sbatch [sbatch options] slurm/eval.sh --model DIR_OR_URL ... (python -m scope_ds.evaluate's arguments)" >&2
  exit 2
fi

scope_init
scope_plan eval "$@"
scope_start_servers
rc=0
scope_run_main --overlap --kill-on-bad-exit=1 --nodes=1 --ntasks=1 --ntasks-per-node=1 --nodelist="$TRAIN_NODES" \
  "$SCOPE_DS_PYTHON" -m scope_ds.evaluate "${EVAL_ARGS[@]}" || rc=$?
exit "$rc"
