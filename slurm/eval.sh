#!/usr/bin/env bash
# Evaluate on one node of a SLURM allocation (docs/cluster.md):
#
#   sbatch [sbatch options] slurm/eval.sh --model [LABEL=]DIR_OR_URL [--model ...] --benchmarks ... --n 32 --out DIR
#
# The arguments are python -m scope_ds.evaluate's. It runs as one job step on the first node; on GPU
# nodes it gets all of that node's GPUs and (unless --backend is given) serves each model folder
# with SGLang on all of them: GPUs / SCOPE_DS_EVAL_TP data-parallel servers of SCOPE_DS_EVAL_TP
# GPUs each, one model after the other. On CPU nodes the evaluator starts the embedded server.
# Its output goes to the job's output file. Site settings: slurm/site.sh.
#SBATCH --job-name=scope_ds-eval
set -euo pipefail

# sbatch runs a copy of this file from its spool folder: find the checkout through the job's Command.
: "${SCOPE_DS_ROOT:=$(cd "$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")/.." && pwd)}"
# shellcheck source=slurm/common.sh
source "$SCOPE_DS_ROOT/slurm/common.sh"
scope_init "usage: sbatch [sbatch options] slurm/eval.sh --model DIR_OR_URL ... (python -m scope_ds.evaluate's arguments)" "$@"
ARGS=("$@")
STEP=(--overlap --kill-on-bad-exit=1 --nodes=1 --ntasks=1 --ntasks-per-node=1 --nodelist="${SCOPE_DS_NODES%% *}")
G=$SCOPE_DS_GPUS_PER_NODE
if [ "$G" -gt 0 ]; then
  if ! printf '%s\n' "$@" | grep -q -- '^--backend'; then
    ARGS+=(--backend sglang --num-servers $((G / SCOPE_DS_EVAL_TP)) --gpus-per-server "$SCOPE_DS_EVAL_TP")
  fi
  if [ "$SCOPE_DS_GPUS_MANAGED" = 1 ]; then STEP+=(--gres="gpu:$G"); fi
fi
rc=0
scope_run_main "${STEP[@]}" "$SCOPE_DS_PYTHON" -m scope_ds.evaluate "${ARGS[@]}" || rc=$?
exit "$rc"
