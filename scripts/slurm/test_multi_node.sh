#!/usr/bin/env bash
# The multi-node template on a real (throwaway) two-node Slurm cluster on this one machine.
#
#   1. start the cluster with two slurmd daemons, nodes n1 and n2 (cluster_up.sh, SLURM_CI_NODES=2;
#      Debian's Slurm is built with multiple-slurmd support)
#   2. submit the shipped scripts/slurm/multi_node.sbatch with --nodes=2 --ntasks-per-node=1 on CPU
#      (ACCELERATOR=cpu, --gres=none): one Lightning process per node, DDP over gloo on 127.0.0.1, and,
#      side by side, the reference: scripts/slurm/cpu.sbatch on one node with 2 tasks; both run
#        litpeft fit --config scripts/slurm/tiny_cpu.yaml   (tiny:llama + LoRA, MAX_STEPS steps)
#   3. check: the two-node job ran on n1 and n2 (NumNodes=2, each node's slurmd launched one task of its
#      step), Lightning saw 2 ranks, both jobs COMPLETED with exit 0, and the two-node adapter equals
#      the one-node adapter (float32 tolerance)
#   4. stop the cluster (cluster_down.sh: only the daemons it started) -- also on failure
#
#   scripts/slurm/test_multi_node.sh [WORK_DIR]   # as root
#
# Env: LITPEFT or PYTHON (the command, as in test_requeue.sh), MAX_STEPS (10), KEEP=1 keeps WORK_DIR.
# The nodes' names (n1, n2) are not in DNS, so the jobs get MASTER_ADDR=127.0.0.1 (Lightning's
# SLURMEnvironment otherwise takes the first host of SLURM_NODELIST); on a real cluster nothing is set.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then echo "test_multi_node: must run as root (it starts slurmd)" >&2; exit 1; fi
T0=$(date +%s)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
W=${1:-$(mktemp -d -t litpeft-nodes.XXXXXX)}
mkdir -p "$W"; W=$(cd "$W" && pwd)
MAX_STEPS=${MAX_STEPS:-10}
M="" R=""

say() { echo "[test_multi_node +$(( $(date +%s) - T0 ))s] $*"; }
fail() {
  say "FAIL: $*"
  for f in "$W"/*.log; do echo "----- $f -----"; tail -n 60 "$f" 2>/dev/null || true; done
  for j in $M $R; do scontrol show job "$j" 2>/dev/null || true; done
  echo "----- slurm logs -----"; tail -n 20 "$W"/cluster/log/*.log 2>/dev/null || true
  exit 1
}
cleanup() {
  rc=$?
  "$HERE/cluster_down.sh" "$W/cluster" >/dev/null 2>&1 || true
  if [ "$rc" = 0 ] && [ "${KEEP:-0}" != 1 ]; then rm -rf "$W"; fi
  say "cluster stopped (exit $rc, total $(( $(date +%s) - T0 ))s)"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

if [ -n "${LITPEFT:-}" ]; then
  read -r -a CMD <<< "$LITPEFT"
elif [ -n "${PYTHON:-}" ]; then
  CMD=("$PYTHON" -m litpeft)
elif [ -x "$REPO/.venv/bin/litpeft" ]; then
  CMD=("$REPO/.venv/bin/litpeft")
else
  echo "test_multi_node: no litpeft found: run \`make install\` or set LITPEFT=... or PYTHON=..." >&2; exit 1
fi
PY=${PYTHON:-$(dirname "${CMD[0]}")/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# ---- 1. two nodes (other ports than test_requeue.sh's cluster, so the two can run side by side)
export SLURM_CI_NODES=2 SLURM_CI_CPUS=${SLURM_CI_CPUS:-4}
export SLURM_CI_CTLD_PORT=${SLURM_CI_CTLD_PORT:-6827} SLURM_CI_SLURMD_PORT=${SLURM_CI_SLURMD_PORT:-6828}
exports=$("$HERE/cluster_up.sh" "$W/cluster") || fail "could not start the Slurm cluster (messages above)"
eval "$exports"
say "cluster up: $(sinfo -h -o '%D nodes %N %t')"

"$PY" - "$W/words.jsonl" <<'PYEOF'
import json, sys
words = "apple river stone cloud maple tiger lemon ocean piano zebra candle forest garden honey island".split()
with open(sys.argv[1], "w") as f:
    for w in words + words[:1]:  # 16 rows: 2 batches of 4 per rank per epoch
        f.write(json.dumps({"instruction": "Reverse the word.", "input": w, "output": w[::-1]}) + "\n")
PYEOF

FIT=("${CMD[@]}" fit --config "$HERE/tiny_cpu.yaml" --data.train_file "$W/words.jsonl"
     --trainer.max_steps "$MAX_STEPS")
# ---- 2. the template on two nodes, and the reference on one node
M=$(cd "$W" && sbatch --parsable --job-name=litpeft-two-nodes --output="$W/two_nodes.log" \
    --nodes=2 --ntasks-per-node=1 --cpus-per-task=1 --gres=none --time=00:15:00 \
    --export=ALL,ACCELERATOR=cpu,MASTER_ADDR=127.0.0.1 "$HERE/multi_node.sbatch" \
    "${FIT[@]}" --trainer.default_root_dir "$W/m" --model.adapter_dir "$W/m/adapter")
R=$(cd "$W" && sbatch --parsable --job-name=litpeft-one-node --output="$W/one_node.log" \
    --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --time=00:15:00 \
    --export=ALL,MASTER_ADDR=127.0.0.1 "$HERE/cpu.sbatch" \
    "${FIT[@]}" --trainer.default_root_dir "$W/r" --model.adapter_dir "$W/r/adapter")
M=${M%%;*} R=${R%%;*}
say "submitted job $M (multi_node.sbatch, 2 nodes x 1 task) and job $R (cpu.sbatch, 1 node x 2 tasks)"
for _ in $(seq 1 600); do
  [ -z "$(squeue -h -j "$M,$R" 2>/dev/null)" ] && break
  sleep 0.5
done
[ -z "$(squeue -h -j "$M,$R" 2>/dev/null)" ] || fail "jobs did not finish in 300 s"
info=$(scontrol show job "$M")   # kept for MinJobAge=300 s after the end
say "both jobs left the queue"

# ---- 3. checks
for j in $M $R; do
  state=$(scontrol show job "$j" | grep -oE 'JobState=[A-Z_]+' | head -1)
  code=$(scontrol show job "$j" | grep -oE ' ExitCode=[0-9:]+' | head -1 | tr -d ' ')
  [ "$state" = JobState=COMPLETED ] || fail "job $j: $state, expected COMPLETED"
  [ "$code" = ExitCode=0:0 ] || fail "job $j: $code, expected ExitCode=0:0"
done
grep -q ' NodeList=n\[1-2\]' <<< "$info" || fail "job $M did not run on n1 and n2: $(grep -o ' NodeList=[^ ]*' <<< "$info")"
grep -q 'NumNodes=2 ' <<< "$info" || fail "job $M: $(grep -oE 'NumNodes=[0-9]+' <<< "$info"), expected 2"
grep -q "nodes=n\[1-2\] (2) tasks_per_node=1" "$W/two_nodes.log" || fail "job $M: not 2 nodes x 1 task"
for n in 1 2; do  # each node's own slurmd started one task of the job step
  grep -q "launch task StepId=$M.0 " "$W/cluster/log/slurmd-n$n.log" || fail "slurmd of n$n launched no task of $M"
done
for r in 0 1; do
  grep -q "GLOBAL_RANK: $r, MEMBER: $(( r + 1 ))/2" "$W/two_nodes.log" || fail "job $M: no rank $r of 2"
done
"$PY" - "$W/m/adapter/adapter.safetensors" "$W/r/adapter/adapter.safetensors" <<'PYEOF' || fail "adapters differ"
import sys
import numpy as np
from safetensors.numpy import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert a.keys() == b.keys() and a, f"different tensors: {sorted(a.keys() ^ b.keys())}"
diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
moved = max(float(np.abs(b[k]).max()) for k in b if "lora_B" in k)
print(f"adapter: {len(a)} tensors, max |two nodes - one node| = {diff:.3g}, max |lora_B| = {moved:.3g}")
assert moved > 0, "the reference adapter did not train (lora_B is still 0)"
for k in a:
    assert np.allclose(a[k], b[k], rtol=1.3e-6, atol=1e-5), f"{k}: max diff {np.abs(a[k] - b[k]).max()}"
PYEOF
say "PASS: job $M ran multi_node.sbatch on nodes n1 and n2 (2 ranks, one per node), job $R on one node" \
    "with 2 tasks; both COMPLETED at step $MAX_STEPS with the same adapter"
