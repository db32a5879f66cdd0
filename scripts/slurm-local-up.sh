#!/usr/bin/env bash
# A one-node Slurm cluster on this machine's loopback, for trying the Slurm profile and for
# the test that runs the workflow through sbatch (tests/test_slurm.py).
#
#   scripts/slurm-local-up.sh      install (once) and start munged, slurmctld, slurmd
#   . /tmp/apo-slurm/env           point sbatch/squeue/scontrol at it (SLURM_CONF)
#   scripts/slurm-local-down.sh    stop exactly the daemons this script started
#
# Everything it writes (configs, munge key, state, logs, pid files) is under $APO_SLURM_DIR
# (default /tmp/apo-slurm); nothing in /etc is changed, so a system Slurm is left alone.
# Needs root (daemons run as root) and, the first time, apt (Debian's slurm-wlm and munge).
set -euo pipefail

DIR=${APO_SLURM_DIR:-/tmp/apo-slurm}
# Not the default ports 6817/6818, so that a real slurmctld/slurmd on this host is not hit.
CTLD_PORT=${APO_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${APO_SLURM_SLURMD_PORT:-16818}
# Fake GPUs: the node advertises this many gres/gpu (no device files), so jobs that ask for
# --gpus are scheduled and accounted as on a GPU cluster. Nothing is bound to a device.
GPUS=${APO_SLURM_GPUS:-2}  # at least 1
PARTITION=${APO_SLURM_PARTITION:-debug}

if [[ $EUID -ne 0 ]]; then
  echo "slurm-local-up: needs root (it starts munged, slurmctld and slurmd as root)" >&2
  exit 2
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "slurm-local-up: installing slurm-wlm and munge (apt)" >&2
  # The packages' own init scripts would start daemons with /etc configs; keep them off.
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
fi

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && alive "$DIR/munged.pid"; then
  echo "slurm-local-up: already running ($DIR)" >&2
  exit 0
fi

mkdir -p "$DIR"/{state,spool,log,munge}
chmod 700 "$DIR/munge"
[[ -f $DIR/munge/munge.key ]] || { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 status=none; chmod 400 "$DIR/munge/munge.key"; }

NODE=localhost
CPUS=$(nproc)
# Leave the node's memory a margin, as slurmd refuses a RealMemory above what it sees.
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))

cat > "$DIR/slurm.conf" <<CONF
# Written by scripts/slurm-local-up.sh: one node, loopback only, no accounting database.
ClusterName=apolocal
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# linuxproc/none: no cgroups needed (containers, CI runners)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# No slurmdbd: sacct has nothing to read, so finished jobs are known only to slurmctld,
# which keeps them this long (seconds). Tests read job records back with scontrol/squeue.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
# gres/gpu needs a device file per GPU (slurmd counts them); links to /dev/null will do.
mkdir -p "$DIR/dev"
for i in $(seq 0 $((GPUS - 1))); do ln -sfn /dev/null "$DIR/dev/gpu$i"; done
cat > "$DIR/gres.conf" <<CONF
AutoDetect=off
NodeName=$NODE Name=gpu File=$DIR/dev/gpu[0-$((GPUS - 1))]
CONF
cat > "$DIR/env" <<CONF
export SLURM_CONF=$DIR/slurm.conf
CONF
export SLURM_CONF=$DIR/slurm.conf
# Snakemake's Slurm job step clears SLURM_* variables (SLURM_CONF too) before its inner
# srun, which then reads the default /etc/slurm/slurm.conf. Link it to ours if there is
# none; slurm-local-down.sh removes the link (and only a link that points here).
if [[ ! -e /etc/slurm/slurm.conf && ! -L /etc/slurm/slurm.conf ]]; then
  mkdir -p /etc/slurm
  ln -s "$DIR/slurm.conf" /etc/slurm/slurm.conf
elif [[ "$(readlink /etc/slurm/slurm.conf)" != "$DIR/slurm.conf" ]]; then
  echo "slurm-local-up: /etc/slurm/slurm.conf exists and is not ours (another Slurm, or a local" >&2
  echo "  cluster in another directory); job steps would read it. Stop that one first." >&2
  exit 1
fi

munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
  --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N "$NODE"

# Ready when the node is idle and takes jobs.
for _ in $(seq 60); do
  if sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^idle'; then
    echo "slurm-local-up: running; partition '$PARTITION', $CPUS CPUs, $MEM_MB MB, $GPUS fake GPUs." >&2
    echo "slurm-local-up: . $DIR/env   # sets SLURM_CONF for sbatch, squeue, scontrol" >&2
    exit 0
  fi
  sleep 1
done
echo "slurm-local-up: node did not become idle; logs in $DIR/log" >&2
sinfo -N -l >&2 || true
exit 1
