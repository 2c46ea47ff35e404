#!/usr/bin/env bash
# Train on a SLURM allocation of one or many nodes (docs/cluster.md):
#
#   sbatch [sbatch options] slurm/train.sh RECIPE [section.key=value ...]
#
#   GPUs, SGLang on the last GPUs of each node (the recipe's rollout.num_servers x gpus_per_server):
#     sbatch --nodes 2 --gpus-per-node 8 --ntasks-per-node 8 --cpus-per-task 8 \
#       slurm/train.sh recipes/r1_distill_1p5b_skywork_7b.yaml
#   CPU (the toy run, the embedded rollout server):
#     sbatch --ntasks 2 slurm/train.sh recipes/toy.yaml
#
# Rollout servers start first, as job steps of their own, and are waited for on /health; their URLs
# go to the trainer as rollout.servers=[...], with the key they require as rollout.api_key (the
# recipe's, else SCOPE_DS_API_KEY, else one generated for the job).
# One training process per GPU (per task on CPU nodes), started by srun with RANK, WORLD_SIZE,
# LOCAL_RANK, MASTER_ADDR and MASTER_PORT; one log per rank in RUN_DIR/logs/train-JOB.RESTART-rankN.log.
# Before the time limit SLURM sends USR1 to this script (--signal below); it is passed on to the
# ranks, which save a checkpoint and stop, and the job requeues itself (SCOPE_DS_REQUEUE=0: not) and
# resumes with checkpoint.resume=auto. Site settings: slurm/site.sh.
#SBATCH --job-name=scope_ds-train
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail

# sbatch runs a copy of this file from its spool folder: find the checkout through the job's Command.
: "${SCOPE_DS_ROOT:=$(cd "$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")/.." && pwd)}"
# shellcheck source=slurm/common.sh
source "$SCOPE_DS_ROOT/slurm/common.sh"
scope_init "usage: sbatch [sbatch options] slurm/train.sh RECIPE [section.key=value ...]" "$@"

RECIPE=$1
shift
ARGS=("$@")
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
  ARGS=(checkpoint.resume=auto "${ARGS[@]}")  # a requeued job continues; an explicit value still wins
fi

scope_plan train "$RECIPE" "${ARGS[@]}"
scope_start_servers
if [ ${#SERVER_URLS[@]} -gt 0 ]; then
  # The servers listen beyond loopback, so they require the job's key (slurm/layout.py: API_KEY).
  ARGS+=("rollout.servers=[$(IFS=,; echo "${SERVER_URLS[*]}")]" "rollout.api_key=$API_KEY")
fi

STEP=(--overlap --kill-on-bad-exit=1 --ntasks="$NTASKS" --output="$LOG_DIR/train-$LOG_TAG-rank%t.log")
if [ "$TASKS_PER_NODE" -gt 0 ]; then  # GPU nodes: one rank per training GPU
  STEP+=(--nodes="$TRAIN_NNODES" --nodelist="$TRAIN_NODES" --ntasks-per-node="$TASKS_PER_NODE")
  if [ "$SCOPE_DS_GPUS_MANAGED" = 1 ]; then STEP+=(--gres="gpu:$TASKS_PER_NODE"); fi
fi
scope_log "training: $NTASKS ranks on $TRAIN_NODES${SEQUENCE_PARALLEL:+, $SEQUENCE_PARALLEL}, rendezvous $MASTER_ADDR:$MASTER_PORT; logs $LOG_DIR/train-$LOG_TAG-rank*.log"
rc=0
# shellcheck disable=SC2016  # expanded by each task's shell, not here
scope_run_main "${STEP[@]}" \
  bash -c 'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$@"' rank \
  "$SCOPE_DS_PYTHON" "$SCOPE_DS_ROOT/scope_ds/train.py" --config "$RECIPE" "${ARGS[@]}" || rc=$?
scope_maybe_requeue
exit "$rc"
