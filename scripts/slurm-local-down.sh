#!/usr/bin/env bash
# Stop the daemons scripts/slurm-local-up.sh started, by their pid files in $APO_SLURM_DIR;
# nothing else is signalled. State and logs stay for inspection (rm -rf the directory to
# start from scratch).
set -uo pipefail

DIR=${APO_SLURM_DIR:-/tmp/apo-slurm}
for name in slurmd slurmctld munged; do  # the reverse of the start order
  pidfile=$DIR/$name.pid
  [[ -f $pidfile ]] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
    echo "slurm-local-down: stopped $name ($pid)" >&2
  fi
  rm -f "$pidfile"
done
if [[ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" == "$DIR/slurm.conf" ]]; then
  rm -f /etc/slurm/slurm.conf
fi
