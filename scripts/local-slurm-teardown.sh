#!/usr/bin/env bash
# local-slurm-teardown.sh - stop the daemons that scripts/local-slurm.sh started (by pidfile,
# never by process name), cancelling any jobs first.
#   --purge  also wipe Slurm's job state (job ids restart at 1) and the accounting database.
# The packages stay installed, so the next scripts/local-slurm.sh takes seconds.
set -uo pipefail
PURGE=0
[[ ${1:-} == --purge ]] && PURGE=1
RUN=/run/slurm
DB_SOCK=/run/mysqld/mysqld.sock
say() { echo "[local-slurm-teardown] $*" >&2; }
running() {
  local pid
  [[ -s $1 ]] && pid=$(<"$1") && [[ -n $pid && "$(cat /proc/"$pid"/comm 2>/dev/null)" == "$2" ]]
}
halt() {
  running "$1" "$2" || { rm -f "$1"; return 0; }
  local pid; pid=$(<"$1"); say "stopping $2 ($pid)"; kill "$pid" 2>/dev/null || true
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && { say "$2 ($pid) ignored SIGTERM; SIGKILL"; kill -9 "$pid" || true; }
  rm -f "$1"
}
[[ $EUID -eq 0 ]] || { say "run as root"; exit 1; }

if running $RUN/slurmctld.pid slurmctld; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [[ -n ${jobs// /} ]]; then
    say "cancelling jobs $jobs"
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 60); do [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break; sleep 0.5; done
  fi
fi
halt $RUN/slurmd.pid slurmd
halt $RUN/slurmctld.pid slurmctld
halt $RUN/slurmdbd.pid slurmdbd
if ((PURGE)) && mariadb-admin --socket=$DB_SOCK ping >/dev/null 2>&1; then
  say "dropping the accounting database"
  mariadb --socket=$DB_SOCK -e 'DROP DATABASE IF EXISTS slurm_acct_db;'
fi
halt /run/mysqld/mysqld.pid mariadbd
halt /run/munge/munged.pid munged
if ((PURGE)); then
  say "removing Slurm state and config"
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/* /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf
fi
say "done"
