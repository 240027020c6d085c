#!/usr/bin/env bash
# A one-host SLURM cluster for the `slurm` tests (make test-slurm): Debian's slurm-wlm + munge, daemons
# started by hand, everything they write (config, munge key, state, spool, logs) in one folder.
#
#   slurm/local_cluster.sh start    # install slurm-wlm + munge if missing, write the config, start munged,
#                                   # slurmctld and slurmd, wait until sinfo shows the node idle
#   eval "$(slurm/local_cluster.sh env)"   # SLURM_CONF for sbatch / squeue / scontrol in this shell
#   slurm/local_cluster.sh status   # the daemons' pids and sinfo; exit 0 only if all three run
#   slurm/local_cluster.sh stop     # cancel its jobs, stop exactly the daemons it started (pid files)
#
# ERG_SLURM_DIR: the folder (default ${TMPDIR:-/tmp}/erg-slurm-$UID). Ports are picked free at start.
# Runs as root only (slurmd starts jobs as their user; apt-get installs the packages).
# Exit status of start: 0 up; 3 this machine cannot run it (not root, apt-get failed, a daemon did not
# come up: the message says which and where its log is); 1: a setting to fix (ERG_SLURM_DIR).
#
# The cluster: one node with the machine's real CPUs and memory (slurmd -C), one partition `debug`,
# proctrack/linuxproc + task/none (no cgroups needed), select/cons_tres with CR_CPU (a task per CPU),
# no accounting database (sacct does not work: submitit then learns a job's end from its result file,
# see slurm/README.md), requeue allowed, short KillWait, scheduling on every event and every 2 s.
set -euo pipefail

DIR="${ERG_SLURM_DIR:-${TMPDIR:-/tmp}/erg-slurm-$(id -u)}"
CONF="$DIR/etc/slurm.conf"
PIDS="$DIR/run"
MARK=.erg-local-cluster  # in $DIR: the folder is this script's (start clears only such a folder's parts)
NOT_HERE=3

say() { echo "local_cluster: $*" >&2; }
cannot() { say "$*"; exit "$NOT_HERE"; }

# --- pid files: a daemon counts as ours only if its pid file names a live process of that program ---
pid_of() {  # pid_of <name>: the pid in $PIDS/<name>.pid if that process runs <name>, else nothing
  local file="$PIDS/$1.pid" pid
  [[ -s "$file" ]] || return 0
  pid="$(tr -dc '0-9' < "$file")"
  [[ -n "$pid" && -r "/proc/$pid/comm" ]] || return 0
  [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$1"* ]] && echo "$pid"
  return 0
}

stop_daemon() {  # stop_daemon <name>: SIGTERM, up to 15 s, then SIGKILL; only the pid of its pid file
  local pid
  pid="$(pid_of "$1")"
  [[ -n "$pid" ]] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 150); do
    [[ -d "/proc/$pid" ]] || { say "stopped $1 (pid $pid)"; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  say "killed $1 (pid $pid: it did not stop within 15 s)"
}

running() { [[ -n "$(pid_of munged)" && -n "$(pid_of slurmctld)" && -n "$(pid_of slurmd)" ]]; }

# --- install ------------------------------------------------------------------------------------------
install_packages() {
  local missing=0
  for program in munged slurmctld slurmd sbatch sinfo; do
    command -v "$program" > /dev/null || missing=1
  done
  [[ "$missing" == 1 ]] || return 0
  command -v apt-get > /dev/null || cannot "slurm-wlm / munge are not installed and there is no apt-get"
  say "installing slurm-wlm and munge with apt-get (once; log: $DIR/log/apt.log)"
  # Debian's policy-rc.d convention: no service starts during the install (we start our own daemons).
  local policy=/usr/sbin/policy-rc.d added=0
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && added=1
  fi
  local ok=1
  { DEBIAN_FRONTEND=noninteractive apt-get update -q \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge; } \
    >> "$DIR/log/apt.log" 2>&1 || ok=0
  [[ "$added" == 1 ]] && rm -f "$policy"
  [[ "$ok" == 1 ]] || cannot "apt-get could not install slurm-wlm munge (see $DIR/log/apt.log)"
}

free_ports() {  # two free TCP ports on this host (bound to port 0 at once, so they differ)
  local python
  python="$(command -v python3 || command -v python || true)"
  [[ -n "$python" ]] || cannot "python3 is needed to pick free ports"
  "$python" - << 'EOF'
import socket

socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# --- the config -----------------------------------------------------------------------------------------
write_config() {
  local host ports ctld_port slurmd_port node
  host="$(hostname -s)"
  read -r ctld_port slurmd_port <<< "$(free_ports)"
  # The node as slurmd sees it (CPUs, sockets, cores, threads, memory); UpTime is not a config key.
  node="$(slurmd -C | head -n 1)"
  [[ "$node" == NodeName=* ]] || cannot "slurmd -C did not describe this node: $node"
  mkdir -p "$DIR/etc"
  cat > "$CONF.tmp" << EOF
# Written by slurm/local_cluster.sh: a one-host cluster for the repo's slurm tests.
ClusterName=erg-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
# cred_expire (Slurm <= 24.x; newer: requeue_delay in SchedulerParameters): a requeued job waits this long
# + 1 s before it may start again (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
TmpFS=$DIR/tmp
PlugStackConfig=$DIR/etc/plugstack.conf
# No cgroups: processes tracked by parentage, tasks not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
# A task per CPU.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Fast scheduling: on every submit / end at once, and the full loops every 2 s / 1 s.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1,sched_min_interval=0,requeue_delay=11
# Arrays: a sweep is one job array.
MaxJobCount=10000
MaxArraySize=10001
# Finished jobs stay visible to squeue / scontrol for 10 min (there is no accounting database).
MinJobAge=600
# Requeue (scontrol requeue, --requeue) allowed; the signal-to-SIGKILL gap short.
JobRequeue=1
KillWait=5
InactiveLimit=0
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=20
$node State=UNKNOWN NodeAddr=127.0.0.1
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  : > "$DIR/etc/plugstack.conf"
  mv "$CONF.tmp" "$CONF"
}

# --- start / stop -------------------------------------------------------------------------------------
wait_idle() {  # until sinfo shows the node idle (60 s)
  local state=""
  for _ in $(seq 120); do
    state="$(SLURM_CONF="$CONF" sinfo -h -N -o '%T' 2>/dev/null | head -n 1 || true)"
    [[ "$state" == idle ]] && return 0
    running || break
    sleep 0.5
  done
  say "the node did not become idle (state: '${state:-none}'); logs:"
  tail -n 15 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 2>/dev/null || true
  return 1
}

ours_or_exit() {  # $DIR is new, empty, or a folder this script made (its marker file)
  if [[ -d "$DIR" && -n "$(ls -A "$DIR")" && ! -f "$DIR/$MARK" ]]; then
    say "$DIR exists and is not a folder of this script: set ERG_SLURM_DIR to a new or empty folder"
    exit 1  # a setting to fix, not a machine that cannot run the cluster
  fi
}

start() {
  if [[ -f "$CONF" ]] && running; then
    say "already running ($CONF)"
    return 0
  fi
  [[ "$(id -u)" == 0 ]] || cannot "needs root (slurmd starts jobs as their user; apt-get installs the packages)"
  ours_or_exit  # before stopping anything: pid files of a folder this script did not make are not ours
  stop_daemons  # leftovers of an earlier start that died halfway (only what its pid files name)
  rm -rf "${DIR:?}"/{etc,state,spool,log,munge,run,tmp}  # a fresh cluster: no jobs or state of the last one
  mkdir -p "$DIR"/{etc,state,spool,log,munge,run,tmp}
  touch "$DIR/$MARK"
  chmod 700 "$DIR" "$DIR/munge"
  install_packages

  # munge: our own key and socket, so nothing of a system munge is used or touched.
  dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$DIR/munge/munge.key"
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$PIDS/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed" \
    || cannot "munged did not start (log: $DIR/log/munged.log)"

  write_config
  export SLURM_CONF="$CONF"
  slurmctld -f "$CONF" || { stop_daemons; cannot "slurmctld did not start (log: $DIR/log/slurmctld.log)"; }
  slurmd -f "$CONF" || { stop_daemons; cannot "slurmd did not start (log: $DIR/log/slurmd.log)"; }
  if ! wait_idle; then
    stop_daemons
    cannot "the cluster did not come up (logs in $DIR/log)"
  fi
  say "up: $(sinfo -h -N -o '%N %T, %c CPUs, %m MB')  (SLURM_CONF=$CONF)"
}

stop_daemons() {
  stop_daemon slurmd
  stop_daemon slurmctld
  stop_daemon munged
}

stop() {
  [[ -d "$DIR" ]] || return 0
  ours_or_exit  # never the daemons of pid files this script did not write (e.g. ERG_SLURM_DIR=/var)
  if [[ -f "$CONF" && -n "$(pid_of slurmctld)" ]]; then
    # Its jobs first: slurmd does not end running job steps when it stops.
    local jobs
    jobs="$(SLURM_CONF="$CONF" squeue -h -o '%A' 2>/dev/null || true)"
    if [[ -n "$jobs" ]]; then
      say "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
      # shellcheck disable=SC2086
      SLURM_CONF="$CONF" scancel $jobs 2>/dev/null || true
      for _ in $(seq 60); do
        [[ -z "$(SLURM_CONF="$CONF" squeue -h -t RUNNING,COMPLETING -o '%A' 2>/dev/null || true)" ]] && break
        sleep 0.5
      done
    fi
  fi
  stop_daemons
}

status() {
  local rc=0
  for daemon in munged slurmctld slurmd; do
    local pid
    pid="$(pid_of "$daemon")"
    echo "$daemon: ${pid:-not running}"
    [[ -n "$pid" ]] || rc=1
  done
  if [[ "$rc" == 0 ]]; then
    SLURM_CONF="$CONF" sinfo -N -o '%N %P %T %c %m' || rc=1
  fi
  return "$rc"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env)
    [[ -f "$CONF" ]] || { say "no cluster in $DIR (run: slurm/local_cluster.sh start)"; exit 1; }
    echo "export SLURM_CONF=$CONF"
    ;;
  *)
    echo "usage: slurm/local_cluster.sh start|stop|status|env   (folder: \$ERG_SLURM_DIR, now $DIR)" >&2
    exit 2
    ;;
esac
