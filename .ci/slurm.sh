#!/usr/bin/env bash
# A one-node Slurm on this machine, to try the job scripts in jobs/ for real (CI runs
# the `slurm`-marked tests against it). Debian/Ubuntu, as root.
#
#   .ci/slurm.sh start     # install (first time), start munged, slurmctld, slurmd; wait until idle
#   .ci/slurm.sh status    # daemons and node state
#   .ci/slurm.sh stop      # stop the daemons by their PID files
#
# Everything lives in a state directory (SLURM_STATE_DIR, default /var/tmp/florist-slurm):
# slurm.conf, the munge key, sockets, PID files, spool and logs. An existing munge or Slurm
# set-up is left alone: munged gets its own key and socket, the daemons their own config.
# Slurm's commands (sbatch, srun, sinfo) read /etc/slurm/slurm.conf unless SLURM_CONF says
# otherwise: `start` links that path to the state directory's config when nothing is
# there yet (and `stop` removes the link); when a config of another Slurm is there, only
# `export SLURM_CONF=$SLURM_STATE_DIR/slurm.conf` reaches this one. `start` ends by printing
# that export line: running it is right in both cases.
#
# `start` when everything is already running only checks the node; `stop` leaves alone
# any process whose PID file is stale (it must still be the daemon the file names).
#
# The node is what `slurmd -C` reports (CPUs, memory), with no accounting, no cgroups
# (proctrack/linuxproc, task/none) and cores as the consumable resource (cons_tres), so
# jobs run as they would on a CPU node of a cluster; `srun --mpi=pmix` needs libpmix-dev.
# SLURM_FAKE_GPUS=N declares N stand-in GPUs (gres gpu on character devices in the state
# directory that are copies of /dev/null), so that `sbatch --gpus-per-task=1` is accepted
# and its way into the job, its srun and each task's CUDA_VISIBLE_DEVICES can be checked
# on a machine without GPUs; CUDA finds nothing, the ranks run on CPU. It takes effect
# when the daemons start (stop them first to change it).
set -euo pipefail

STATE=${SLURM_STATE_DIR:-/var/tmp/florist-slurm}
CTLD_PORT=${SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_SLURMD_PORT:-6818}
WAIT_S=${SLURM_WAIT_S:-60}
FAKE_GPUS=${SLURM_FAKE_GPUS:-0}
CONF="$STATE/slurm.conf"
SYSTEM_CONF=/etc/slurm/slurm.conf
PACKAGES=(slurm-wlm munge libpmix-dev)

say() { echo "slurm.sh: $*"; }
die() { echo "slurm.sh: error: $*" >&2; exit 1; }

# PID from a PID file when that process is still running the named program, else empty.
live_pid() {
  local file=$1 name=$2 pid
  [[ -s "$file" ]] || return 0
  pid=$(<"$file")
  if [[ "$pid" =~ ^[0-9]+$ && -r /proc/$pid/comm && "$(</proc/$pid/comm)" == "$name" ]]; then
    echo "$pid"
  fi
}

install_packages() {
  local missing=() pkg
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  (( ${#missing[@]} == 0 )) && return 0
  command -v apt-get >/dev/null || die "needs apt-get to install ${missing[*]} (Debian/Ubuntu)"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d: the packages' own services must not start (no systemd here, and this
  # script starts its own daemons); removed again right after.
  local policy=/usr/sbin/policy-rc.d created=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && created=1
  fi
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null || { (( created )) && rm -f "$policy"; die "apt-get install ${PACKAGES[*]} failed"; }
  (( created )) && rm -f "$policy"
  return 0
}

start_munge() {
  local dir="$STATE/munge"
  if [[ -n "$(live_pid "$dir/munged.pid" munged)" ]]; then
    return 0
  fi
  id munge >/dev/null 2>&1 || die "no 'munge' user: is the munge package installed?"
  mkdir -p "$dir"
  chown munge:munge "$dir"
  chmod 0755 "$dir"   # clients (sbatch, slurmd) reach the socket in here
  if [[ ! -s "$dir/munge.key" ]]; then
    mungekey -c -k "$dir/munge.key"
    chown munge:munge "$dir/munge.key"
    chmod 0600 "$dir/munge.key"
  fi
  runuser -u munge -- munged --key-file="$dir/munge.key" --socket="$dir/munge.socket" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munged.seed" \
    || die "munged did not start (see $dir/munged.log)"
}

write_conf() {
  local host node
  host=$(hostname -s)
  # slurmd -C: "NodeName=<host> CPUs=... Boards=... SocketsPerBoard=... ... RealMemory=..."
  node=$(slurmd -C | grep '^NodeName=') || die "slurmd -C reported no node"
  mkdir -p "$STATE/ctld" "$STATE/d" "$STATE/log"
  local gres_types="" gres=""
  rm -f "$STATE/gres.conf" "$STATE"/fake-gpu*
  if (( FAKE_GPUS > 0 )); then
    local i
    for (( i = 0; i < FAKE_GPUS; i++ )); do
      mknod "$STATE/fake-gpu$i" c 1 3   # slurmd wants a device file per GPU: /dev/null's numbers
    done
    gres_types="GresTypes=gpu"
    gres="Gres=gpu:$FAKE_GPUS"
    printf 'AutoDetect=off\nName=gpu File=%s/fake-gpu[0-%d]\n' "$STATE" $((FAKE_GPUS - 1)) > "$STATE/gres.conf"
  fi
  cat > "$CONF" <<EOF
# One-node Slurm written by .ci/slurm.sh (state in $STATE).
ClusterName=florist
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
SlurmctldTimeout=30
SlurmdTimeout=60
KillWait=5
MinJobAge=3600
$gres_types
$node $gres NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

link_system_conf() {
  if [[ -L "$SYSTEM_CONF" && "$(readlink "$SYSTEM_CONF")" == "$CONF" ]]; then
    return 0
  fi
  if [[ -e "$SYSTEM_CONF" || -L "$SYSTEM_CONF" ]]; then
    say "$SYSTEM_CONF belongs to another Slurm set-up: left alone; use export SLURM_CONF=$CONF"
    return 0
  fi
  mkdir -p "$(dirname "$SYSTEM_CONF")"
  ln -s "$CONF" "$SYSTEM_CONF"
}

node_state() {
  SLURM_CONF="$CONF" sinfo --noheader --format=%t 2>/dev/null | head -n 1 || true
}

start() {
  [[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts daemons)"
  install_packages
  mkdir -p "$STATE"
  start_munge
  local ctld slurmd
  ctld=$(live_pid "$STATE/slurmctld.pid" slurmctld)
  slurmd=$(live_pid "$STATE/slurmd.pid" slurmd)
  if [[ -z "$ctld" && -z "$slurmd" ]]; then
    write_conf   # rewritten only while no daemon reads it
  fi
  link_system_conf
  if [[ -z "$ctld" ]]; then
    slurmctld -f "$CONF" || die "slurmctld did not start (see $STATE/log/slurmctld.log)"
  fi
  if [[ -z "$slurmd" ]]; then
    slurmd -f "$CONF" || die "slurmd did not start (see $STATE/log/slurmd.log)"
  fi
  local waited=0 state
  while :; do
    state=$(node_state)
    case "$state" in
      idle|mix|alloc) break ;;
      down*|drain*|fail*) SLURM_CONF="$CONF" scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
    esac
    (( waited >= WAIT_S )) && die "node not idle after ${WAIT_S}s (state '${state:-no answer}'); see $STATE/log/"
    sleep 1
    waited=$((waited + 1))
  done
  say "ready: node $(hostname -s) is $state ($(SLURM_CONF="$CONF" sinfo --noheader --format='%c CPUs, %m MB'))"
  say "for Slurm's commands in your shell: export SLURM_CONF=$CONF"
}

stop_daemon() {
  local file=$1 name=$2 pid waited=0
  pid=$(live_pid "$file" "$name")
  if [[ -z "$pid" ]]; then
    rm -f "$file"
    return 0
  fi
  kill "$pid"
  while [[ -d /proc/$pid ]] && (( waited < 30 )); do
    sleep 0.5
    waited=$((waited + 1))
  done
  [[ -d /proc/$pid ]] && kill -9 "$pid" 2>/dev/null || true
  rm -f "$file"
  say "stopped $name ($pid)"
}

# Jobs still on this one-node cluster (a test that timed out): cancel them so that their
# slurmstepd and ranks end with the daemons instead of running on.
cancel_jobs() {
  [[ -n "$(live_pid "$STATE/slurmctld.pid" slurmctld)" ]] || return 0
  local jobs waited=0
  jobs=$(SLURM_CONF="$CONF" squeue --noheader --format=%A 2>/dev/null | sort -u) || return 0
  [[ -n "$jobs" ]] || return 0
  say "cancelling jobs $(echo $jobs)"
  # shellcheck disable=SC2086
  SLURM_CONF="$CONF" scancel $jobs || true
  while [[ -n "$(SLURM_CONF="$CONF" squeue --noheader --format=%A 2>/dev/null)" ]] && (( waited < 30 )); do
    sleep 1
    waited=$((waited + 1))
  done
}

stop() {
  cancel_jobs
  stop_daemon "$STATE/slurmd.pid" slurmd
  stop_daemon "$STATE/slurmctld.pid" slurmctld
  stop_daemon "$STATE/munge/munged.pid" munged
  if [[ -L "$SYSTEM_CONF" && "$(readlink "$SYSTEM_CONF")" == "$CONF" ]]; then
    rm -f "$SYSTEM_CONF"
  fi
}

status() {
  local name file pid
  for name in munged slurmctld slurmd; do
    file="$STATE/$name.pid"
    [[ $name == munged ]] && file="$STATE/munge/munged.pid"
    pid=$(live_pid "$file" "$name")
    if [[ -n "$pid" ]]; then echo "$name: running ($pid)"; else echo "$name: not running"; fi
  done
  echo "node: $(node_state)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status   (state in \$SLURM_STATE_DIR, default /var/tmp/florist-slurm)" >&2; exit 2 ;;
esac
