#!/usr/bin/env bash
# A real one-node SLURM cluster for the `slurm` tests: munge, slurmctld, slurmd, and slurmdbd on a
# local MariaDB (submitit uses sacct to see cancelled or killed jobs). Debian/Ubuntu, run as root.
# Adapted from the team's shared tools/slurm-local-cluster.sh.
#   tests/slurm/cluster.sh up|down      (SLURM_DIR, default /tmp/moa-slurm; export SLURM_CONF=$SLURM_DIR/slurm.conf)
set -euo pipefail
D=${SLURM_DIR:-/tmp/moa-slurm}
export SLURM_CONF=$D/slurm.conf
wait_for() { for _ in $(seq 120); do eval "$1" >/dev/null 2>&1 && return 0; sleep 0.5; done; echo "timeout: $1" >&2; return 1; }

up() {
  if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge slurmdbd mariadb-server >/dev/null
  fi
  rm -rf "$D"; mkdir -p "$D/state" "$D/spool" "$D/log" /run/munge; chown munge:munge /run/munge
  [ -s /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null || runuser -u munge -- /usr/sbin/munged
  NODE=$(slurmd -C | head -1 | sed 's/ RealMemory=[0-9]*//'); MEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  cat > "$SLURM_CONF" <<CONF
ClusterName=moa-ci
SlurmctldHost=$(hostname -s)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=5,bf_interval=1
KillWait=5
$NODE RealMemory=$((MEM * 9 / 10)) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  mariadb-install-db --user=root --datadir="$D/mysql" --auth-root-authentication-method=normal >/dev/null
  (setsid mariadbd --user=root --datadir="$D/mysql" --socket="$D/mysql.sock" --bind-address=127.0.0.1 --port=3306 \
     --skip-name-resolve --pid-file="$D/mariadb.pid" --log-error="$D/log/mariadb.log" </dev/null >/dev/null 2>&1 &)
  wait_for "mariadb -S $D/mysql.sock -uroot -e 'select 1'"
  mariadb -S "$D/mysql.sock" -uroot -e "CREATE USER IF NOT EXISTS 'slurm'@'%' IDENTIFIED BY 'slurmpw'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'%';"
  printf '%s\n' AuthType=auth/munge DbdHost=localhost SlurmUser=root StorageType=accounting_storage/mysql \
    StorageHost=127.0.0.1 StoragePort=3306 StorageUser=slurm StoragePass=slurmpw StorageLoc=slurm_acct_db \
    "LogFile=$D/log/slurmdbd.log" "PidFile=$D/slurmdbd.pid" > "$D/slurmdbd.conf"
  chmod 600 "$D/slurmdbd.conf"
  /usr/sbin/slurmdbd; wait_for "sacctmgr -n list cluster"
  /usr/sbin/slurmctld -f "$SLURM_CONF"; /usr/sbin/slurmd -f "$SLURM_CONF"
  wait_for "sinfo -h -o %T | grep -qx idle"
}

down() {  # by PID, newest daemons first
  for f in "$D/slurmd.pid" "$D/slurmctld.pid" "$D/slurmdbd.pid" "$D/mariadb.pid" /run/munge/munged.pid; do
    [ -s "$f" ] || continue; p=$(cat "$f"); kill "$p" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
  done
}

"$@"
