#!/usr/bin/env bash
# Stop a cluster started by cluster_up.sh: cancel its jobs, then stop only the daemons whose pid files
# cluster_up.sh left in STATE_DIR (slurmd or one per node, slurmctld, and munged if it started one).
#   scripts/slurm/cluster_down.sh [STATE_DIR]      # default: $SLURM_CI_DIR
# Pass --purge as a second argument to also delete STATE_DIR.
set -uo pipefail
D=${1:-${SLURM_CI_DIR:-}}
if [ -z "$D" ] || [ ! -d "$D" ]; then echo "[cluster_down] usage: $0 STATE_DIR [--purge]" >&2; exit 1; fi

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Cancel this cluster's jobs first: slurmstepd and the job processes outlive slurmd otherwise.
if [ -f "$D/etc/slurm.conf" ] && alive "$D/slurmctld.pid"; then
  export SLURM_CONF=$D/etc/slurm.conf
  if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
    scancel --full $(squeue -h -o %i) 2>/dev/null || true
    for _ in $(seq 1 30); do [ -z "$(squeue -h -t R,CG,S -o %i 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi

for f in "$D"/slurmd.pid "$D"/slurmd-*.pid "$D/slurmctld.pid" "$D/munged.pid"; do   # slurmd-<node>: SLURM_CI_NODES>1
  [ -s "$f" ] || continue
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$f"
done
if [ "${2:-}" = --purge ]; then rm -rf "$D"; fi
exit 0
