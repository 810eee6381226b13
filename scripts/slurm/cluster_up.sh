#!/usr/bin/env bash
# Start a throwaway Slurm cluster (slurmctld + slurmd + munge) on localhost, for testing the sbatch
# templates and the preemption/requeue path for real. Needs root (Debian/Ubuntu, no systemd needed).
# SLURM_CI_NODES=N (default 1) starts N slurmd daemons on this host, nodes n1..nN on ports
# SLURM_CI_SLURMD_PORT, +1, ...: Debian's Slurm is built with multiple-slurmd support
# (`scontrol show config` says MULTIPLE_SLURMD = Yes), so a multi-node job runs on one machine.
#
#   eval "$(scripts/slurm/cluster_up.sh [STATE_DIR])"   # exports SLURM_CONF and SLURM_CI_DIR
#   sbatch scripts/slurm/cpu.sbatch ...
#   scripts/slurm/cluster_down.sh "$SLURM_CI_DIR"
#
# STATE_DIR defaults to $SLURM_CI_DIR, else a fresh temp dir. stdout carries only `export ...` lines;
# progress and errors go to stderr. Installs slurmctld slurmd slurm-client munge with apt-get if missing.
# Env knobs: SLURM_CI_AUTH=munge|none, SLURM_CI_CPUS (default: nproc), SLURM_CI_MEM_MB,
# SLURM_CI_CTLD_PORT (6817), SLURM_CI_SLURMD_PORT (6818), SLURM_CI_NODES (1). SLURM_CI_CPUS is per node.
# Adapted from shared/reference/slurm_up.sh (Slurm 22.05 on Debian 12).
set -euo pipefail
log() { echo "[cluster_up] $*" >&2; }

if [ "$(id -u)" != 0 ]; then log "must run as root (slurmd needs it)"; exit 1; fi

D=${1:-${SLURM_CI_DIR:-}}
if [ -z "$D" ]; then D=$(mktemp -d -t slurm-local.XXXXXX); fi
mkdir -p "$D"
D=$(cd "$D" && pwd)
AUTH=${SLURM_CI_AUTH:-munge}
NODE=$(hostname -s)
CPUS=${SLURM_CI_CPUS:-$(nproc)}
MEM_MB=${SLURM_CI_MEM_MB:-$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))}
CTLD_PORT=${SLURM_CI_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_CI_SLURMD_PORT:-6818}
NODES=${SLURM_CI_NODES:-1}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
emit() { echo "export SLURM_CONF=$D/etc/slurm.conf"; echo "export SLURM_CI_DIR=$D"; }

if alive "$D/slurmctld.pid" && { alive "$D/slurmd.pid" || alive "$D/slurmd-n1.pid"; }; then
  log "cluster in $D already running"; emit; exit 0
fi

# 1. packages
need=()
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v sbatch >/dev/null || need+=(slurm-client)
if [ "$AUTH" = munge ]; then command -v munged >/dev/null || need+=(munge); fi
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]} (apt-get, ~15 s)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

mkdir -p "$D"/{etc,state,spool,log}
chmod 755 "$D" "$D"/{etc,state,spool,log}

# 2. munge: reuse a running munged (e.g. a system service), else start one and remember its pid.
if [ "$AUTH" = munge ]; then
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
  fi
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge; chmod 755 /run/munge
    runuser -u munge -- /usr/sbin/munged         # daemonizes; pid in /run/munge/munged.pid
    for _ in $(seq 1 20); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$D/munged.pid"
    munge -n | unmunge >/dev/null || { log "munge does not work"; exit 1; }
  else
    log "reusing the munged that is already running"
  fi
fi

# 3. config. Short timers so that tests are fast: cred_expire=10 lets a requeued job start again
# after ~10 s, sched_interval/bf_interval=2 schedule pending jobs quickly.
cat > "$D/etc/slurm.conf" <<CONF
ClusterName=litpeftci
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/$AUTH
CredType=cred/$AUTH
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
JobRequeue=1
KillWait=5
MinJobAge=300
CONF
if [ "$NODES" = 1 ]; then
  echo "NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN" >> "$D/etc/slurm.conf"
else
  # several slurmd on this host: each its own node name, port, pid file, spool dir and log (%n: node name)
  sed -i -e "s|^SlurmdSpoolDir=.*|SlurmdSpoolDir=$D/spool/%n|" -e "s|^SlurmdPidFile=.*|SlurmdPidFile=$D/slurmd-%n.pid|" \
    -e "s|^SlurmdLogFile=.*|SlurmdLogFile=$D/log/slurmd-%n.log|" "$D/etc/slurm.conf"
  for i in $(seq 1 "$NODES"); do
    mkdir -p "$D/spool/n$i"
    echo "NodeName=n$i NodeHostname=$NODE NodeAddr=127.0.0.1 Port=$(( SLURMD_PORT + i - 1 )) CPUs=$CPUS" \
      "RealMemory=$MEM_MB State=UNKNOWN" >> "$D/etc/slurm.conf"
  done
fi
echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$D/etc/slurm.conf"
export SLURM_CONF=$D/etc/slurm.conf

# 4. daemons (both daemonize and write the pid files named in slurm.conf)
slurmctld -c
if [ "$NODES" = 1 ]; then
  slurmd -N "$NODE"
else
  for i in $(seq 1 "$NODES"); do slurmd -N "n$i"; done
fi
for _ in $(seq 1 60); do
  if [ "$(sinfo -h -o %t 2>/dev/null)" = idle ]; then
    sinfo >&2
    emit
    exit 0
  fi
  sleep 0.5
done
log "slurm did not come up; logs:"
tail -n 30 "$D"/log/*.log >&2
exit 1
