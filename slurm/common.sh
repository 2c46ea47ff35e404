# What slurm/train.sh and slurm/eval.sh share (sourced, not run): site settings, the allocation,
# rollout servers as job steps, the main step that gets SLURM's signals, requeue and cleanup.
# Expects SCOPE_DS_ROOT (the checkout) and a running job (SLURM_JOB_ID).
# shellcheck shell=bash

scope_log() { echo "[scope_ds $(date +%H:%M:%S)] $*" >&2; }

# scope_init USAGE "$@": the script's arguments (none: print USAGE, exit 2), then the allocation,
# site settings and environment; sets SCOPE_DS_NODES, SCOPE_DS_GPUS_PER_NODE, MASTER_PORT, and
# stops this job's servers on exit.
scope_init() {
  if [ $# -lt 2 ]; then
    echo "$1" >&2
    exit 2
  fi
  export SCOPE_DS_ROOT
  # shellcheck source=slurm/site.sh
  source "$SCOPE_DS_ROOT/slurm/site.sh"
  export PYTHONPATH="$SCOPE_DS_ROOT${PYTHONPATH:+:$PYTHONPATH}"
  SCOPE_DS_NODES=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd ' ')
  SCOPE_DS_GPUS_PER_NODE=${SCOPE_DS_GPUS_PER_NODE:-$(scope_gpus_per_node)}
  # SLURM hands out the GPUs when the job asked for them (--gpus-per-node, --gres): then each step
  # asks for its own and sees only those. Otherwise every step sees all GPUs and we pick by index.
  SCOPE_DS_GPUS_MANAGED=0
  [ -n "${SLURM_JOB_GPUS:-}${SLURM_GPUS_ON_NODE:-}" ] && SCOPE_DS_GPUS_MANAGED=1
  SCOPE_DS_NTASKS=${SLURM_NTASKS:-1}
  # Ports from the job id, so that two jobs sharing a node do not collide: servers take
  # PORT_BASE + i on each node, the torch.distributed rendezvous PORT_BASE + 15.
  SCOPE_DS_PORT_BASE=${SCOPE_DS_PORT_BASE:-$((20000 + SLURM_JOB_ID % 700 * 16))}
  export SCOPE_DS_NODES SCOPE_DS_GPUS_PER_NODE SCOPE_DS_GPUS_MANAGED SCOPE_DS_NTASKS SCOPE_DS_PORT_BASE
  export MASTER_PORT=${MASTER_PORT:-$((SCOPE_DS_PORT_BASE + 15))}
  SCOPE_SERVER_PIDS=()
  SCOPE_STEP_PID=""
  SCOPE_SIGNALLED=""
  trap scope_stop_servers EXIT
  trap 'scope_forward USR1' USR1  # a signal before the main step: it is not started (scope_run_main)
  trap 'scope_forward TERM' TERM
  scope_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): nodes $SCOPE_DS_NODES; GPUs per node $SCOPE_DS_GPUS_PER_NODE"
}

scope_gpus_per_node() {
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 0
  fi
}

# scope_plan train RECIPE [OVERRIDES...]: slurm/layout.py's plan (variables and arrays), evaluated here.
# A bad recipe or a layout that does not fit ends the job before anything starts.
scope_plan() {
  local plan
  plan=$("$SCOPE_DS_PYTHON" "$SCOPE_DS_ROOT/slurm/layout.py" "$@") || exit 2
  eval "$plan"
  LOG_DIR=${SCOPE_DS_LOG_DIR:-$RUN_DIR/logs}
  mkdir -p "$LOG_DIR"
  export MASTER_ADDR=${MASTER_ADDR:-${TRAIN_NODES%%,*}}
  # One tag per job and restart: a requeued job appends new log files beside the old ones.
  LOG_TAG="$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}"
}

# srun without the job's GPU request variables, which a step would otherwise inherit as its own.
# An array, not a function: `"${SCOPE_SRUN[@]}" ... &` makes $! the pid of srun itself (env execs
# it), so that a signal sent there reaches srun, which passes it on to the step's tasks.
SCOPE_SRUN=(env -u SLURM_GPUS_PER_NODE -u SLURM_GPUS -u SLURM_GPUS_PER_TASK -u SLURM_TRES_PER_TASK srun)

# Start SERVER_CMDS[i] on SERVER_NODES[i] as background job steps; wait until all answer /health.
scope_start_servers() {
  local i gres=()
  [ ${#SERVER_CMDS[@]} -eq 0 ] && return 0
  for i in "${!SERVER_CMDS[@]}"; do
    [ "$SCOPE_DS_GPUS_MANAGED" = 1 ] && gres=(--gres="gpu:${SERVER_GPUS[$i]}")
    "${SCOPE_SRUN[@]}" --job-name="scope_ds-server-$i" --overlap --kill-on-bad-exit=1 \
      --nodes=1 --ntasks=1 --ntasks-per-node=1 --nodelist="${SERVER_NODES[$i]}" "${gres[@]}" \
      --output="$LOG_DIR/server-$LOG_TAG-$i.log" bash -c "exec ${SERVER_CMDS[$i]}" &
    SCOPE_SERVER_PIDS+=($!)
    scope_log "server $i on ${SERVER_NODES[$i]} (step pid $!): ${SERVER_URLS[$i]}; log $LOG_DIR/server-$LOG_TAG-$i.log"
  done
  if ! SCOPE_DS_STARTUP_TIMEOUT=$STARTUP_TIMEOUT "$SCOPE_DS_PYTHON" "$SCOPE_DS_ROOT/slurm/layout.py" \
    wait --pids "${SCOPE_SERVER_PIDS[*]}" "${SERVER_URLS[@]}"; then
    tail -n 30 "$LOG_DIR"/server-"$LOG_TAG"-*.log >&2 || true
    exit 1
  fi
}

# Stop the server steps: SIGTERM to their tasks through scancel (a signal to srun itself would make
# it kill the step at once), then srun's own termination after 30 s.
scope_stop_servers() {
  local step name pid
  [ ${#SCOPE_SERVER_PIDS[@]} -eq 0 ] && return 0
  while read -r step name; do
    if [[ $name == scope_ds-server-* ]]; then scancel --signal=TERM "$step" 2>/dev/null || true; fi
  done < <(squeue -h --steps --jobs "$SLURM_JOB_ID" --format "%i %j" 2>/dev/null || true)
  for pid in "${SCOPE_SERVER_PIDS[@]}"; do
    for _ in $(seq 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  SCOPE_SERVER_PIDS=()
}

# A signal for the batch shell goes on to the main step's ranks as USR1, which srun passes on to
# its tasks (a TERM sent to srun would make it kill them at once); the ranks save a checkpoint and
# stop. USR1 comes from --signal=B:USR1@N before the time limit; TERM from scancel or preemption,
# when SLURM also sends TERM to every task itself.
scope_forward() {
  SCOPE_SIGNALLED=$1
  scope_log "got SIG$1: asking the main step (srun pid ${SCOPE_STEP_PID:-not started yet}) to save and stop"
  [ -n "$SCOPE_STEP_PID" ] && kill -s USR1 "$SCOPE_STEP_PID" 2>/dev/null
  return 0
}

# scope_run_main SRUN_ARGS...: the main step in the background (so that traps run while it works),
# signals forwarded to it (scope_init set the traps); returns its exit status.
scope_run_main() {
  local rc
  if [ -n "$SCOPE_SIGNALLED" ]; then  # signalled while setting up: nothing trained yet, nothing to save
    scope_log "SIG$SCOPE_SIGNALLED came before the main step: not starting it"
    return 0
  fi
  "${SCOPE_SRUN[@]}" "$@" &
  SCOPE_STEP_PID=$!
  while :; do
    rc=0
    wait "$SCOPE_STEP_PID" || rc=$?
    kill -0 "$SCOPE_STEP_PID" 2>/dev/null || break  # a trap interrupted wait: keep waiting
  done
  SCOPE_STEP_PID=""
  scope_log "main step exited with status $rc"
  return "$rc"
}

# After the pre-timeout signal: put the job back in the queue (same id, SLURM_RESTART_COUNT + 1).
scope_maybe_requeue() {
  if [ "$SCOPE_SIGNALLED" = USR1 ] && [ "$SCOPE_DS_REQUEUE" = 1 ]; then
    scope_stop_servers
    scope_log "requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
}
