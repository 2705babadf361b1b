#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, with accounting, for the tests and CI.
#
#   scripts/slurm-local.sh start    install Debian's packages if missing, start from clean state
#                                   (no-op when already up), wait until the node is idle
#   scripts/slurm-local.sh stop     cancel jobs, stop every daemon this script starts
#   scripts/slurm-local.sh status   exit 0 when the cluster accepts jobs, 1 otherwise
#
# Exit codes: 0 ok, 1 failure (the logs' tails are printed), 2 usage,
# 3 unsupported here (not root, or not Debian): callers skip the SLURM tests with that reason.
#
# The machines this runs on have no systemd and no cgroups, so the daemons are started directly
# and the cgroup-free plugins are used. Accounting (slurmdbd + MariaDB) is not optional: submitit
# reads job states with sacct, and without it a job that dies hard leaves job.result() waiting.
#
# Everything (config, logs, spool, database) lives under RFTBENCH_SLURM_DIR; the client tools
# find the config through symlinks in /etc/slurm. munged keeps Debian's default socket and key,
# which the SLURM tools use.
set -euo pipefail

readonly DIR="${RFTBENCH_SLURM_DIR:-/var/lib/rftbench-slurm}"
readonly DB_PORT="${RFTBENCH_SLURM_DB_PORT:-3307}" # not 3306: leaves the system's MariaDB port alone
readonly CLUSTER=rftbench
readonly NODE=localhost # slurmd is told its name (-N), so the machine's hostname never matters
readonly MAX_ARRAY_SIZE=1001
readonly PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server mariadb-client)
readonly ETC_SLURM=/etc/slurm
readonly MUNGE_PID=/run/munge/munged.pid
readonly DB_SOCKET="$DIR/run/mariadb.sock"
readonly START_TIMEOUT=60 # seconds for each daemon to come up

log() { printf 'slurm-local: %s\n' "$*" >&2; }

# Print why this machine cannot host the cluster and exit 3 (callers skip on that code).
unsupported() {
  log "unsupported: $*"
  exit 3
}

check_platform() {
  [[ $(id -u) -eq 0 ]] || unsupported "must run as root (installs packages and starts system daemons)"
  if [[ ! -f /etc/debian_version ]] || ! command -v apt-get >/dev/null; then
    unsupported "needs Debian (apt-get and Debian's slurm packages)"
  fi
  # Guard every rm -rf below against an empty or relative directory.
  [[ $DIR == /?* && $DIR != / ]] || { log "RFTBENCH_SLURM_DIR must be an absolute path: '$DIR'"; exit 2; }
}

# ---------------------------------------------------------------- installation

missing_packages() {
  local pkg
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || echo "$pkg"
  done
}

install_packages() {
  local missing
  mapfile -t missing < <(missing_packages)
  ((${#missing[@]})) || return 0
  log "installing: ${missing[*]}"
  # Forbid the packages' postinst scripts from starting daemons on the system's default
  # paths (a system MariaDB on /var/lib/mysql, a slurmctld without config): we start our own.
  local policy=/usr/sbin/policy-rc.d own_policy=
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
  fi
  local rc=0
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  } >"/tmp/slurm-local-apt.log" 2>&1 || rc=$?
  [[ -n $own_policy ]] && rm -f "$policy"
  if [[ $rc -ne 0 ]]; then
    tail -n 20 /tmp/slurm-local-apt.log >&2
    log "package installation failed (full log: /tmp/slurm-local-apt.log)"
    exit 1
  fi
}

# ---------------------------------------------------------------- process helpers

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Wait until "$@" succeeds, or fail naming what did not come up.
wait_for() {
  local what=$1 deadline=$((SECONDS + START_TIMEOUT))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "$what did not come up within ${START_TIMEOUT}s"
    sleep 0.2
  done
}

any_alive() {
  local pid
  for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}

# TERM the processes in the given pid files together (each takes 1-3 s to exit, so one at a
# time adds up), KILL any that linger, and forget the pid files.
stop_pidfiles() {
  local pidfile pids=() i
  for pidfile in "$@"; do
    pid_alive "$pidfile" && pids+=("$(cat "$pidfile")")
  done
  if ((${#pids[@]})); then
    kill "${pids[@]}" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
      any_alive "${pids[@]}" || break
      sleep 0.1
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
  fi
  rm -f "$@"
}

fail() {
  log "start failed: $*"
  local f
  for f in "$DIR"/log/*.log /var/log/munge/munged.log; do
    [[ -s $f ]] || continue
    printf '\n==> %s (last 15 lines) <==\n' "$f" >&2
    tail -n 15 "$f" >&2
  done
  log "logs: $DIR/log/ and /var/log/munge/munged.log"
  exit 1
}

# ---------------------------------------------------------------- configuration

# RealMemory a little under the total, so slurmd never finds less than configured (it would
# drain the node).
real_memory_mb() {
  local total
  total=$(free -m | awk '/^Mem:/ {print $2}')
  echo $((total - (total / 20 < 1024 ? total / 20 : 1024)))
}

write_slurm_conf() {
  cat >"$DIR/etc/slurm.conf" <<EOF
# Generated by scripts/slurm-local.sh: a single-node test cluster. Edits are overwritten.
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Default 120 s: a requeued job would wait that long for its old credential to expire.
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups here: track processes through /proc and bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
# No mail on this machine; the default /bin/mail is absent.
MailProg=/bin/true
# The default batching adds about 2.5 s per scheduling wave.
SchedulerParameters=batch_sched_delay=0,sched_interval=1,sched_min_interval=0
JobRequeue=1
MaxArraySize=$MAX_ARRAY_SIZE
ReturnToService=2
SlurmdTimeout=10
SlurmctldTimeout=10
MessageTimeout=10
KillWait=2
InactiveLimit=0
Waittime=0
# Finished jobs leave slurmctld's memory after a minute; sacct keeps them (accounting).
MinJobAge=60
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$NODE
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$(nproc) RealMemory=$(real_memory_mb) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

write_slurmdbd_conf() {
  local password=$1
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
# Generated by scripts/slurm-local.sh. Edits are overwritten.
AuthType=auth/munge
DbdHost=$NODE
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$password
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf" # slurmdbd wants it private: it holds the DB password
}

# The Debian tools read /etc/slurm; point it at our files, but never clobber a foreign config.
link_config() {
  local name target
  mkdir -p "$ETC_SLURM"
  for name in slurm.conf slurmdbd.conf; do
    target="$ETC_SLURM/$name"
    if [[ -e $target && ! -L $target ]]; then
      fail "$target exists and is not ours (a symlink); move it away to use the local cluster"
    fi
    ln -sfn "$DIR/etc/$name" "$target"
  done
}

# ---------------------------------------------------------------- daemons

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  # munged refuses to run as root; --force replaces a socket left by a killed munged.
  runuser -u munge -- /usr/sbin/munged --force </dev/null >/dev/null 2>&1 || fail "munged did not start"
  wait_for munged sh -c 'munge -n | unmunge'
}

# MariaDB on its own datadir and a loopback port, so it never touches a system database.
start_mariadb() {
  install -d -o mysql -g mysql -m 0750 "$DIR/mysql"
  # root logs in through the unix socket as the OS root user: no password to keep.
  mariadb-install-db --no-defaults --datadir="$DIR/mysql" --user=mysql \
    --auth-root-authentication-method=socket --skip-test-db \
    >"$DIR/log/mariadb-install.log" 2>&1 || fail "mariadb-install-db failed"
  # mariadbd drops to user mysql before it opens its socket, pid file and log.
  chown mysql:mysql "$DIR/run"
  install -o mysql -g mysql -m 0640 /dev/null "$DIR/log/mariadb.log"
  # setsid and closed stdio: the daemon must not hold the caller's terminal or CI's pipes.
  # Durability settings are relaxed: this database is thrown away with the cluster.
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DIR/mysql" \
    --socket="$DB_SOCKET" --port="$DB_PORT" --bind-address=127.0.0.1 \
    --pid-file="$DIR/run/mariadb.pid" --log-error="$DIR/log/mariadb.log" \
    --innodb-lock-wait-timeout=900 \
    --innodb-flush-log-at-trx-commit=2 --skip-name-resolve \
    </dev/null >/dev/null 2>&1 &
  wait_for mariadbd mariadb-admin --no-defaults --socket="$DB_SOCKET" ping
}

create_accounting_db() {
  local password=$1
  mariadb --no-defaults --socket="$DB_SOCKET" -u root <<EOF || fail "could not create the accounting database"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$password';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

start_slurmdbd() {
  /usr/sbin/slurmdbd </dev/null >/dev/null 2>&1 || fail "slurmdbd did not start"
  wait_for slurmdbd sacctmgr -n list cluster
  # slurmctld only records jobs for a cluster slurmdbd knows.
  sacctmgr -i add cluster "$CLUSTER" >/dev/null || fail "sacctmgr could not register cluster $CLUSTER"
}

start_slurm() {
  /usr/sbin/slurmctld </dev/null >/dev/null 2>&1 || fail "slurmctld did not start"
  wait_for slurmctld scontrol ping
  /usr/sbin/slurmd -N "$NODE" </dev/null >/dev/null 2>&1 || fail "slurmd did not start"
  wait_for "node $NODE (idle)" node_is idle
}

# True when sinfo shows the node in one of the given short states (and responding: no '*').
node_is() {
  local state
  state=$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null) || return 1
  local want
  for want in "$@"; do [[ $state == "$want" ]] && return 0; done
  return 1
}

# Cancel every job, so no job step outlives its slurmd.
cancel_jobs() {
  scontrol ping >/dev/null 2>&1 || return 0
  scancel --partition=debug >/dev/null 2>&1 || true
  local i
  for ((i = 0; i < 50; i++)); do
    [[ -z $(squeue -h -t running,completing -o %i 2>/dev/null) ]] && return 0
    sleep 0.2
  done
}

# ---------------------------------------------------------------- commands

is_up() {
  local daemon
  pid_alive "$MUNGE_PID" || return 1
  for daemon in slurmdbd slurmctld slurmd mariadb; do
    pid_alive "$DIR/run/$daemon.pid" || return 1
  done
  node_is idle mix alloc comp
}

cmd_status() {
  if is_up; then
    echo "up: cluster $CLUSTER, node $NODE $(sinfo -h -n "$NODE" -o '%t'), config $ETC_SLURM/slurm.conf, logs $DIR/log"
  else
    echo "down (start it with: scripts/slurm-local.sh start)"
    return 1
  fi
}

cmd_stop() {
  cancel_jobs
  # Each group after the one it depends on: slurmctld reports to slurmdbd, which writes to MariaDB.
  stop_pidfiles "$DIR/run/slurmd.pid" "$DIR/run/slurmctld.pid"
  stop_pidfiles "$DIR/run/slurmdbd.pid" "$MUNGE_PID"
  stop_pidfiles "$DIR/run/mariadb.pid"
  echo "stopped"
}

cmd_start() {
  if is_up; then
    echo "already up"
    return 0
  fi
  install_packages
  local t0=$SECONDS
  # A fresh start: leftover daemons go, and the SLURM state and the accounting database are
  # wiped TOGETHER (job ids restart at 1; a kept database would make sacct report stale jobs).
  cmd_stop >/dev/null
  rm -rf "${DIR:?}/etc" "$DIR/log" "$DIR/run" "$DIR/spool" "$DIR/mysql"
  install -d -m 0755 "$DIR" "$DIR/etc" "$DIR/log" "$DIR/run" "$DIR/spool/ctld" "$DIR/spool/d"
  local password
  password=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
  write_slurm_conf
  write_slurmdbd_conf "$password"
  link_config
  start_munge
  start_mariadb
  create_accounting_db "$password"
  start_slurmdbd
  start_slurm
  echo "up in $((SECONDS - t0))s: cluster $CLUSTER, partition debug, node $NODE ($(nproc) CPUs), logs $DIR/log"
}

main() {
  local cmd=${1:-}
  case $cmd in
    start | stop | status) ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
  esac
  check_platform
  "cmd_$cmd"
}

main "$@"
