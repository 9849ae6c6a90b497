#!/usr/bin/env bash
# local-slurm.sh - a single-node Slurm cluster on localhost, for the harness's Slurm tests and for
# trying `harness sweep SPEC --launcher slurm` on one machine.
#
# Debian 12 (Slurm 22.05) or newer, run as root, no systemd and no cgroups needed. It installs
# munge, slurmctld, slurmd, slurm-client, slurmdbd and mariadb-server from the Debian archive,
# writes /etc/slurm/slurm.conf and slurmdbd.conf, and starts the daemons in the background.
# Accounting (slurmdbd + MariaDB) is on: submitit reads job states from `sacct`; without it a
# cancelled or timed-out job never shows as ended.
#
# Idempotent: a second call finds everything installed and running and returns in seconds;
# the daemons are restarted only when the generated slurm.conf changed.
#
#   LOCAL_SLURM_WAIT_S=90         upper bound for each wait
#   LOCAL_SLURM_CLUSTER=harness   cluster name
#   LOCAL_SLURM_DB_PASS=...       password of the local 'slurm' MariaDB user
# Stop it with scripts/local-slurm-teardown.sh (--purge also wipes job state and the database).
set -euo pipefail

WAIT_S=${LOCAL_SLURM_WAIT_S:-90}
CLUSTER=${LOCAL_SLURM_CLUSTER:-harness}
DB_PASS=${LOCAL_SLURM_DB_PASS:-harness-slurmdb}
NODE=$(hostname -s)
ETC=/etc/slurm
RUN=/run/slurm
LOG=/var/log/slurm
DB_SOCK=/run/mysqld/mysqld.sock

say() { echo "[local-slurm] $*" >&2; }
fail() {
  say "ERROR: $*"
  for f in "$LOG"/slurmctld.log "$LOG"/slurmd.log "$LOG"/slurmdbd.log "$LOG"/mariadb.log; do
    [[ -f $f ]] && { echo "--- last lines of $f" >&2; tail -n 15 "$f" >&2; }
  done
  exit 1
}
# await WHAT CMD... : retry CMD every 0.5 s until it succeeds or WAIT_S passes
await() {
  local what=$1; shift
  local deadline=$((SECONDS + WAIT_S))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "gave up after ${WAIT_S}s waiting for $what"
    sleep 0.5
  done
}
# running PIDFILE NAME : the pidfile names a live process called NAME
running() {
  local pid
  [[ -s $1 ]] && pid=$(<"$1") && [[ -n $pid && "$(cat /proc/"$pid"/comm 2>/dev/null)" == "$2" ]]
}
# halt PIDFILE NAME : SIGTERM the process of the pidfile (never by name), SIGKILL after 20 s
halt() {
  running "$1" "$2" || { rm -f "$1"; return 0; }
  local pid; pid=$(<"$1"); kill "$pid" 2>/dev/null || true
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  rm -f "$1"
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

[[ $EUID -eq 0 ]] || fail "run as root (sudo $0): it installs packages and starts system daemons"
command -v apt-get >/dev/null || fail "needs a Debian/Ubuntu system with apt-get"
t0=$SECONDS

# 1. packages -------------------------------------------------------------------------------
want=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
need=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need+=("$p")
done
if ((${#need[@]})); then
  say "installing ${need[*]}"
  # stop the packages' maintainer scripts from starting daemons before our config exists
  own_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; own_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt_opts=(-o DPkg::Lock::Timeout=300 -o Acquire::Retries=3)
  apt-get "${apt_opts[@]}" update -qq
  apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  ((own_policy)) && rm -f /usr/sbin/policy-rc.d
fi

# 2. the node's name must resolve -------------------------------------------------------------
getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >>/etc/hosts

# 3. munge (authentication) -------------------------------------------------------------------
[[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key --force
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged
fi
await "munge" bash -c 'munge -n | unmunge'

# 4. slurm.conf -------------------------------------------------------------------------------
install -d -m 0755 "$ETC" "$RUN" "$LOG" /var/spool/slurmctld /var/spool/slurmd
CPUS=$(nproc)
GPUS=${LOCAL_SLURM_GPUS:-2}   # fake GPUs: see gres.conf below
MEM_MB=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
((MEM_MB > 1024)) && MEM_MB=$((MEM_MB - 512))   # stay under what slurmd measures, or the node drains
conf=$(cat <<CONF
# written by the harness's scripts/local-slurm.sh; rewritten on each call
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
KillWait=5
EnforcePartLimits=ALL
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageTRES=gres/gpu
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
MaxArraySize=10001
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
)
# GPUs the node declares, so Slurm allocates and accounts GPUs per job (per-run resources are testable here)
# while the jobs run on the CPU. slurmd counts a gpu gres by its device files (a count alone reports 0), so
# each fake GPU is a character device that reads as /dev/null: nothing binds it (task/none), nothing opens it.
gres=""
for ((i = 0; i < GPUS; i++)); do
  [[ -e /dev/fakegpu$i ]] || mknod -m 0666 /dev/fakegpu$i c 1 3
  gres+="NodeName=$NODE Name=gpu File=/dev/fakegpu$i"$'\n'
done
gres=${gres%$'\n'}
if [[ ! -f $ETC/gres.conf || "$(cat "$ETC/gres.conf")" != "$gres" ]]; then
  printf '%s\n' "$gres" >"$ETC/gres.conf"
  rm -f "$ETC/slurm.conf"  # restart below: slurmd reads gres.conf only at start
fi
if [[ ! -f $ETC/slurm.conf || "$(cat "$ETC/slurm.conf")" != "$conf" ]]; then
  if running $RUN/slurmctld.pid slurmctld || running $RUN/slurmd.pid slurmd; then
    say "slurm.conf changed: restarting slurmd and slurmctld"
    halt $RUN/slurmd.pid slurmd
    halt $RUN/slurmctld.pid slurmctld
  fi
  printf '%s\n' "$conf" >"$ETC/slurm.conf"
fi

# 5. accounting: MariaDB + slurmdbd -------------------------------------------------------------
install -d -o mysql -g root -m 0755 /run/mysqld
if ! mariadb-admin --socket=$DB_SOCK ping >/dev/null 2>&1; then
  say "starting mariadbd"
  setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid --socket=$DB_SOCK \
    --bind-address=127.0.0.1 --innodb-lock-wait-timeout=900 >>"$LOG/mariadb.log" 2>&1 </dev/null &
fi
await "mariadb" mariadb-admin --socket=$DB_SOCK ping
mariadb --socket=$DB_SOCK -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
  ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
dbd=$(cat <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$DB_PASS
CONF
)
if [[ ! -f $ETC/slurmdbd.conf || "$(cat "$ETC/slurmdbd.conf")" != "$dbd" ]]; then
  halt $RUN/slurmdbd.pid slurmdbd
  (umask 077; printf '%s\n' "$dbd" >"$ETC/slurmdbd.conf")
fi
chmod 0600 "$ETC/slurmdbd.conf"
running $RUN/slurmdbd.pid slurmdbd || { say "starting slurmdbd"; slurmdbd; }
await "slurmdbd on port 6819" port_open 6819
sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true   # exits 1 when it already exists

# 6. slurmctld + slurmd -------------------------------------------------------------------------
running $RUN/slurmctld.pid slurmctld || { say "starting slurmctld"; slurmctld || fail "slurmctld did not start"; }
await "slurmctld" scontrol ping
running $RUN/slurmd.pid slurmd || { say "starting slurmd"; slurmd -N "$NODE" || fail "slurmd did not start"; }

state() { sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -n1; }
deadline=$((SECONDS + WAIT_S))
until [[ $(state) =~ ^(idle|mix|alloc)$ ]]; do
  st=$(state)
  if [[ $st =~ (down|drain|drng|fail) ]]; then
    say "node $NODE is '$st' ($(sinfo -h -N -n "$NODE" -o %E)); resuming it"
    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
  fi
  ((SECONDS < deadline)) || fail "node $NODE not ready after ${WAIT_S}s (state '$st')"
  sleep 1
done
say "ready in $((SECONDS - t0)) s: cluster '$CLUSTER', node $NODE ($CPUS CPUs, $MEM_MB MB), partition 'debug'"
sinfo
