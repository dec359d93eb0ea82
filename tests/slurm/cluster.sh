#!/usr/bin/env bash
# A real one-node SLURM cluster with accounting, on this machine, for the SLURM tests.
#   tests/slurm/cluster.sh up     install (Debian packages) if needed, start, wait until idle
#   tests/slurm/cluster.sh down   stop the daemons it started (by PID, never by name)
#   tests/slurm/cluster.sh status
# Idempotent. Needs root. Facts behind each setting: shared/docs/slurm-test-cluster.md.
set -euo pipefail

ROOT=${CKAFLOW_SLURM_ROOT:-/var/tmp/ckaflow-slurm}
CONF=/etc/slurm
PARTITION=debug
PIDS="$ROOT/pids"

log() { echo "[slurm-cluster] $*" >&2; }

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  for _ in $(seq $((limit * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  log "timed out after ${limit}s waiting for $what"; return 1
}

# a daemon is alive if its PID file names a live process of that name (PIDs get reused)
alive() {
  local pid
  pid=$(cat "$PIDS/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

install() {
  local missing=()
  for bin in slurmctld slurmd slurmdbd munged mariadbd sacct; do
    command -v "$bin" >/dev/null || missing+=("$bin")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing SLURM, munge and MariaDB (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge slurmdbd mariadb-server >/dev/null
}

write_config() {
  mkdir -p "$ROOT"/{state,spool,log} "$PIDS" "$CONF"
  chmod 1777 "$PIDS"  # munged, mariadbd and slurmctld write their PID files as their own users
  chown -R slurm:slurm "$ROOT/state" "$ROOT/log"
  local mem cpus
  cpus=$(nproc)
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  mem=$((mem - 1024))
  cat >"$CONF/slurm.conf" <<CONF
ClusterName=ckaflow
SlurmctldHost=localhost
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=5
SlurmdParameters=config_overrides
MinJobAge=300
KillWait=5
MailProg=/bin/true
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$((cpus * 4)) RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  cat >"$CONF/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=slurm
LogFile=$ROOT/log/slurmdbd.log
PidFile=$PIDS/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=ckaflow
StorageLoc=slurm_acct_db
CONF
  chown slurm:slurm "$CONF/slurmdbd.conf"
  chmod 600 "$CONF/slurmdbd.conf"
}

start_munge() {
  mkdir -p /run/munge
  chown munge:munge /run/munge
  [ -f /etc/munge/munge.key ] || { mungekey --create >/dev/null 2>&1 || true; }
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  # a munged that answers is enough, whoever started it
  if ! sh -c 'munge -n </dev/null | unmunge' >/dev/null 2>&1; then
    su -s /bin/sh munge -c "munged --force --pid-file=$PIDS/munged.pid"
    wait_for 10 munged sh -c 'munge -n </dev/null | unmunge'
  fi
}

start_mariadb() {
  if ! mariadb-admin ping >/dev/null 2>&1; then
    mkdir -p /run/mysqld
    chown mysql:mysql /run/mysqld
    mariadbd --user=mysql --bind-address=127.0.0.1 --innodb-buffer-pool-size=32M \
      --pid-file="$PIDS/mariadbd.pid" >"$ROOT/log/mariadb.log" 2>&1 &
    wait_for 30 mariadb mariadb-admin ping
  fi
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'ckaflow';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

up() {
  install
  write_config
  start_munge
  start_mariadb
  if ! alive slurmdbd; then
    slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
  fi
  if ! alive slurmctld; then
    slurmctld
    wait_for 30 slurmctld scontrol ping
  fi
  if ! alive slurmd; then
    slurmd -N localhost
  fi
  wait_for 60 "an idle node" sh -c "sinfo -h -o %T | grep -qx idle"
  # the root user needs an association to submit (slurmctld registers the cluster itself)
  sacctmgr -i -n add account root Cluster=ckaflow >/dev/null 2>&1 || true
  log "up: partition $PARTITION, $(sinfo -h -o '%c CPUs, %m MB')"
}

down() {
  for daemon in slurmd slurmctld slurmdbd mariadbd munged; do
    if alive "$daemon"; then
      kill "$(cat "$PIDS/$daemon.pid")" 2>/dev/null || true
    fi
  done
  log "stopped"
}

status() {
  for daemon in munged mariadbd slurmdbd slurmctld slurmd; do
    if alive "$daemon"; then echo "$daemon: running"; else echo "$daemon: not running"; fi
  done
  sinfo 2>/dev/null || true
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
