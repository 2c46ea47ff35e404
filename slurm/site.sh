# Site settings for slurm/train.sh and slurm/eval.sh: the one place for the partition, modules,
# the Python environment, NCCL and the job layout knobs. Sourced (not run) by both scripts inside
# the job. Defaults here; a cluster's own values go in a file named by $SCOPE_DS_SITE, sourced
# right after the defaults (plain assignments there win).
#
# #SBATCH lines are read before any file is sourced, so the submission settings (partition,
# account, time) reach sbatch through its SBATCH_* variables: source this file in your shell
# before submitting, `source slurm/site.sh && sbatch ... slurm/train.sh ...`, or give them on the
# sbatch command line.
# shellcheck shell=bash

# ---- submission (empty: the cluster's default) ----
: "${SCOPE_DS_PARTITION:=}"  # -> SBATCH_PARTITION
: "${SCOPE_DS_ACCOUNT:=}"    # -> SBATCH_ACCOUNT
: "${SCOPE_DS_TIME:=}"       # -> SBATCH_TIMELIMIT, e.g. 24:00:00

# ---- environment inside the job ----
: "${SCOPE_DS_MODULES:=}"     # space-separated `module load` names, e.g. "cuda/12.4 nccl/2.21"
: "${SCOPE_DS_CONDA_ENV:=}"   # a conda env to activate (needs conda on PATH)
: "${SCOPE_DS_VENV:=${SCOPE_DS_ROOT:-.}/.venv}"  # a virtualenv to activate, when it exists
: "${SCOPE_DS_PYTHON:=python}"                   # the interpreter, after activation

# ---- layout (see docs/cluster.md) ----
: "${SCOPE_DS_SERVER_LAYOUT:=tail}"   # tail: last GPUs of every node serve | nodes: whole nodes at the end
: "${SCOPE_DS_LAUNCH_SERVERS:=script}"  # script: rollout servers are job steps | trainer: rank 0 starts them (CPU only)
: "${SCOPE_DS_SGLANG_MEM:=0.7}"       # SGLang --mem-fraction-static (weights + KV cache share of a GPU)
: "${SCOPE_DS_SGLANG_ARGS:=}"         # extra sglang.launch_server flags, e.g. "--context-length 16384"
: "${SCOPE_DS_EVAL_TP:=1}"            # eval.sh: tensor-parallel GPUs per SGLang replica
: "${SCOPE_DS_REQUEUE:=1}"            # 1: requeue the job after the pre-timeout signal (USR1) | 0: do not

if [ -n "${SCOPE_DS_SITE:-}" ]; then
  # shellcheck disable=SC1090
  source "$SCOPE_DS_SITE"
fi

[ -n "$SCOPE_DS_PARTITION" ] && export SBATCH_PARTITION="$SCOPE_DS_PARTITION"
[ -n "$SCOPE_DS_ACCOUNT" ] && export SBATCH_ACCOUNT="$SCOPE_DS_ACCOUNT"
[ -n "$SCOPE_DS_TIME" ] && export SBATCH_TIMELIMIT="$SCOPE_DS_TIME"
export SCOPE_DS_SERVER_LAYOUT SCOPE_DS_LAUNCH_SERVERS SCOPE_DS_SGLANG_MEM SCOPE_DS_SGLANG_ARGS SCOPE_DS_EVAL_TP

if [ -n "${SLURM_JOB_ID:-}" ]; then  # inside the job only
  set +u  # module and activate scripts read unset variables
  if [ -n "$SCOPE_DS_MODULES" ]; then
    # shellcheck disable=SC2086
    module load $SCOPE_DS_MODULES
  fi
  if [ -n "$SCOPE_DS_CONDA_ENV" ]; then
    eval "$(conda shell.bash hook)" && conda activate "$SCOPE_DS_CONDA_ENV"
  elif [ -f "$SCOPE_DS_VENV/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$SCOPE_DS_VENV/bin/activate"
  fi
  set -u
  # NCCL: fail fast on a lost peer instead of hanging; interfaces and HCAs are per cluster
  # (set NCCL_SOCKET_IFNAME / NCCL_IB_HCA in your $SCOPE_DS_SITE file).
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  # One thread per rank unless the job gave a task more CPUs.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
  export PYTHONUNBUFFERED=1
fi
true  # a sourced file's status is its last command's
