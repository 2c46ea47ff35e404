#!/usr/bin/env bash
# A one-node SLURM (munged, slurmctld, slurmd) and Open MPI on this machine, for CI and the tests
# in tests/integration/test_slurm.py and test_mpi.py. Needs root (apt-get, daemons).
#
#   tools/ci_services.sh [start]  install what is missing, write slurm.conf, start the daemons
#   tools/ci_services.sh mpi      only Open MPI (Debian) and mpi4py (into ./.venv, if it exists)
#   tools/ci_services.sh status   exit 0 when the node answers and takes jobs
#   tools/ci_services.sh stop     stop the daemons that this script started, by pid
#
# Idempotent: installed packages are not reinstalled, daemons already running are left alone (and
# are not stopped by `stop` unless this script started them). State, logs and pid files live in
# $SCOPE_DS_SLURM_STATE (default /var/tmp/scope_ds_slurm). slurm.conf is written to
# /etc/slurm/slurm.conf (where every SLURM command looks) unless a file there came from elsewhere.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${SCOPE_DS_SLURM_STATE:-/var/tmp/scope_ds_slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by scope_ds tools/ci_services.sh"
NODE=$(hostname -s)

log() { echo "ci_services: $*" >&2; }

apt_install() {  # apt_install PKG...: install the Debian packages that are missing (one apt-get update)
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_mpi() {
  apt_install libopenmpi-dev openmpi-bin
  local py="$ROOT/.venv/bin/python"
  if [ -x "$py" ] && ! "$py" -c "import mpi4py" 2>/dev/null; then
    log "installing mpi4py into $ROOT/.venv"
    "$py" -m pip install -q mpi4py
  fi
}

# alive PIDFILE NAME: the pid in the file runs NAME (not a stale file whose pid was reused)
alive() { [ -s "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$2" ]; }

wait_for() {  # wait_for SECONDS WHAT CMD...: poll CMD until it succeeds
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      log "timed out waiting for $what"
      return 1
    fi
    sleep 0.5
  done
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    log "$CONF exists and was not written by this script; using it as it is"
    return 0
  fi
  local cpus mem_mb
  cpus=$(nproc)
  mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 512))  # slurmd drains a node that claims more
  mkdir -p "$STATE/ctld" "$STATE/spool" /etc/slurm
  cat >"$CONF" <<EOF
$MARK for scope_ds tests; rewritten on each start.
ClusterName=scopeci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# No cgroups in a container: track job processes through their parents, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Finished jobs stay visible to scontrol for 10 minutes (there is no accounting database for sacct).
MinJobAge=600
KillWait=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munged() {
  munge_works && return 0
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
  chmod 0400 /etc/munge/munge.key
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged  # daemonises; writes /run/munge/munged.pid
  wait_for 20 munged test -s /run/munge/munged.pid
  cp /run/munge/munged.pid "$STATE/munged.pid"
  echo munged >>"$STATE/started"
  wait_for 20 "munge to answer" munge_works
}

start_daemon() {  # start_daemon NAME ARGS...: NAME daemonises and writes $STATE/NAME.pid
  local name=$1
  shift
  alive "$STATE/$name.pid" "$name" && return 0
  rm -f "$STATE/$name.pid"
  "/usr/sbin/$name" "$@"
  wait_for 30 "$name (log: $STATE/$name.log)" alive "$STATE/$name.pid" "$name"
  echo "$name" >>"$STATE/started"
}

node_ready() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; }

clean_shm() {  # DeepSpeed's CPU shared-memory allreduce leaves a 66 MB file per rank per run in
  # /dev/shm, never removed: about 5 GB a suite, until memory runs out. Remove those no process maps.
  local f
  for f in /dev/shm/deepspeed_*; do
    [ -e "$f" ] || continue
    grep -qsF "$f" /proc/[0-9]*/maps || rm -f "$f"
  done
}

clean_stale_locks() {  # a JIT op build killed midway leaves torch's lock file, and every later run
  # waits on it forever; a build takes under a minute, so a lock older than 10 minutes is stale
  find "${HOME:-/root}/.cache/torch_extensions" -name lock -mmin +10 -delete 2>/dev/null || true
}

start() {
  clean_shm
  clean_stale_locks
  apt_install slurm-wlm munge e2fsprogs  # e2fsprogs: chattr, for the read-only folders of test_faults.py
  ensure_mpi
  mkdir -p "$STATE"
  if node_ready; then
    log "SLURM already answers on $NODE"
    return 0
  fi
  write_conf
  start_munged
  start_daemon slurmctld -c  # -c: start from a clean state (no jobs from an earlier run)
  start_daemon slurmd -N "$NODE"
  if ! wait_for 60 "node $NODE to be idle" node_ready; then
    scontrol update nodename="$NODE" state=resume 2>/dev/null || true
    wait_for 30 "node $NODE to be idle" node_ready || {
      sinfo -N -l >&2 || true
      tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
      return 1
    }
  fi
  log "SLURM up on $NODE ($(sinfo -h -N -o '%c CPUs, %m MB'))"
}

stop_pid() {  # stop_pid NAME PIDFILE: SIGTERM, then SIGKILL after 20 s
  local name=$1 pidfile=$2 pid
  alive "$pidfile" "$name" || return 0
  pid=$(cat "$pidfile")
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 40); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.5
  done
  kill -KILL "$pid" 2>/dev/null || true
}

stop() {
  clean_shm
  [ -f "$STATE/started" ] || return 0
  local name
  for name in slurmd slurmctld munged; do  # the reverse of the start order
    if grep -qx "$name" "$STATE/started"; then stop_pid "$name" "$STATE/$name.pid"; fi
  done
  rm -f "$STATE/started"
}

case "${1:-start}" in
  start) start ;;
  mpi) ensure_mpi ;;
  status) node_ready ;;
  stop) stop ;;
  *)
    echo "usage: $0 [start|mpi|status|stop]" >&2
    exit 2
    ;;
esac
