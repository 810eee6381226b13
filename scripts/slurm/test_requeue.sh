#!/usr/bin/env bash
# End-to-end test of litpeft on a real (throwaway, single-node) Slurm cluster: preemption, requeue,
# auto-resume, and a final adapter equal to an uninterrupted run's.
#
#   1. start the cluster (cluster_up.sh; installs slurmctld/slurmd/slurm-client/munge with apt if missing)
#   2. submit two jobs with the shipped scripts/slurm/cpu.sbatch, both
#        litpeft fit --config scripts/slurm/tiny_cpu.yaml   (tiny:llama + LoRA, 2 gloo DDP ranks, 30 steps)
#      job A ("interrupted") and job B ("reference", never signalled), on the same generated data
#   3. when A has done SIGNAL_AT_STEP steps: `scancel --signal=USR1 A`
#   4. check: A saved <root>/resume/last.ckpt at that step, requeued itself (Restarts=1,
#      SLURM_RESTART_COUNT=1), resumed by itself at the same step with the same batches and the same LR
#      as B at every step, finished at max_steps, COMPLETED with exit 0; and A's final adapter equals B's
#   5. check that three jobs fail at startup with one clear line instead of hanging or resuming the wrong
#      run: a new job reusing B's run directory, a job whose Trainer disagrees with its task count, and a
#      2-task job that forgot `srun`
#   6. stop the cluster (cluster_down.sh: only the daemons it started) -- also on failure
#
#   scripts/slurm/test_requeue.sh [WORK_DIR]   # as root; ~1 min on an idle 2-core machine, 3 min loaded
#
# Env: LITPEFT (the command, default: <repo>/.venv/bin/litpeft) or PYTHON (runs `$PYTHON -m litpeft`),
# MAX_STEPS (30), SIGNAL_AT_STEP (8), KEEP=1 keeps WORK_DIR on success (it is always kept on failure). PYTHONPATH is passed on to the job
# with the repo prepended, so the checkout's own code runs. Exit 0 = pass.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "test_requeue: must run as root (it starts slurmd and may apt-get install Slurm)" >&2; exit 1
fi
T0=$(date +%s)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
W=${1:-$(mktemp -d -t litpeft-requeue.XXXXXX)}
mkdir -p "$W"; W=$(cd "$W" && pwd)
MAX_STEPS=${MAX_STEPS:-30}
SIGNAL_AT_STEP=${SIGNAL_AT_STEP:-8}
A_LOG=$W/interrupted.log
B_LOG=$W/reference.log
A="" B=""

say() { echo "[test_requeue +$(( $(date +%s) - T0 ))s] $*"; }
fail() {
  say "FAIL: $*"
  for f in "$A_LOG" "$B_LOG"; do echo "----- $f -----"; tail -n 80 "$f" 2>/dev/null || true; done
  for j in $A $B; do scontrol show job "$j" 2>/dev/null || true; done
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
trap 'exit 143' TERM INT   # a killed test still runs cleanup (stops the daemons it started)

# ---- the command the job runs
if [ -n "${LITPEFT:-}" ]; then
  read -r -a CMD <<< "$LITPEFT"
elif [ -n "${PYTHON:-}" ]; then
  CMD=("$PYTHON" -m litpeft)
elif [ -x "$REPO/.venv/bin/litpeft" ]; then
  CMD=("$REPO/.venv/bin/litpeft")
else
  echo "test_requeue: no litpeft found: run \`make install\` or set LITPEFT=/path/to/litpeft or PYTHON=..." >&2
  exit 1
fi
PY=${PYTHON:-$(dirname "${CMD[0]}")/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$REPO:$HERE${PYTHONPATH:+:$PYTHONPATH}"   # the checkout's code + requeue_probe.py
command -v "${CMD[0]}" >/dev/null || { echo "test_requeue: ${CMD[0]} not found" >&2; exit 1; }

# ---- 1. cluster
# 6 CPUs in Slurm's view, whatever the machine has: A and B run side by side, and so do the three
# fail-fast jobs (the work is the same; the waits for scheduling and startup overlap).
export SLURM_CI_CPUS=${SLURM_CI_CPUS:-6}
exports=$("$HERE/cluster_up.sh" "$W/cluster") || fail "could not start the Slurm cluster (messages above)"
eval "$exports"
say "cluster up: SLURM_CONF=$SLURM_CONF"

# ---- 2. data and the two jobs
"$PY" - "$W/words.jsonl" <<'PYEOF'
import json, sys
words = ("apple river stone cloud maple tiger lemon ocean piano zebra candle forest garden honey island "
         "jungle kettle ladder mirror needle orange pepper quartz rocket saddle turtle violet window yellow "
         "basket bridge castle dragon engine falcon glider harbor insect jacket kitten").split()
with open(sys.argv[1], "w") as f:
    for w in words:  # 40 rows: 5 batches of 4 per rank per epoch, so 30 steps cross 5 epoch boundaries
        f.write(json.dumps({"instruction": "Reverse the word.", "input": w, "output": w[::-1]}) + "\n")
PYEOF

submit() {  # submit NAME LOG ROOT [PROBE_INIT_ARGS]: cpu.sbatch with `litpeft fit --config tiny_cpu.yaml`
  local name=$1 log=$2 root=$3 probe=${4:-"{}"} id
  id=$(cd "$W" && sbatch --parsable --job-name="$name" --output="$log" --export=ALL "$HERE/cpu.sbatch" \
       "${CMD[@]}" fit --config "$HERE/tiny_cpu.yaml" \
       --data.train_file "$W/words.jsonl" \
       --trainer.max_steps "$MAX_STEPS" \
       --trainer.default_root_dir "$root" \
       --model.adapter_dir "$root/adapter" \
       --trainer.callbacks+="{\"class_path\": \"requeue_probe.StepProbe\", \"init_args\": $probe}")
  echo "${id%%;*}"
}
A=$(submit litpeft-requeue-a "$A_LOG" "$W/a" \
    "{\"block_at_step\": $SIGNAL_AT_STEP, \"ready_file\": \"$W/a_ready\"}")
B=$(submit litpeft-requeue-b "$B_LOG" "$W/b")
say "submitted job $A (interrupted) and job $B (reference)"

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local t=$1 what=$2; shift 2
  for _ in $(seq 1 $(( t * 2 ))); do "$@" && return 0; sleep 0.5; done
  fail "timed out after ${t}s waiting for: $what"
}
has() { grep -qE "$2" "$1" 2>/dev/null; }
gone() { [ -z "$(squeue -h -j "$1" 2>/dev/null)" ]; }

wait_for 300 "job $A to reach step $SIGNAL_AT_STEP" test -s "$W/a_ready"
say "job $A at step $SIGNAL_AT_STEP: scancel --signal=USR1 $A"
scancel --signal=USR1 "$A"
wait_for 120 "the preemption checkpoint" has "$A_LOG" "preemption signal: saved"
say "checkpoint saved; waiting for the requeued run"
wait_for 300 "the requeued run (SLURM_RESTART_COUNT=1)" has "$A_LOG" "SLURM_RESTART_COUNT=1"
say "job $A requeued and restarted; waiting for both jobs to finish"
wait_for 420 "job $A to finish" gone "$A"
wait_for 300 "job $B to finish" gone "$B"
say "both jobs left the queue"

# ---- 4. checks
for j in $A $B; do
  info=$(scontrol show job "$j")
  state=$(grep -oE 'JobState=[A-Z_]+' <<< "$info" | head -1)
  code=$(grep -oE ' ExitCode=[0-9:]+' <<< "$info" | head -1 | tr -d ' ')
  [ "$state" = JobState=COMPLETED ] || fail "job $j: $state, expected COMPLETED"
  [ "$code" = ExitCode=0:0 ] || fail "job $j: $code, expected ExitCode=0:0"
done
restarts=$(scontrol show job "$A" | grep -oE 'Restarts=[0-9]+' | head -1)
[ "$restarts" = Restarts=1 ] || fail "job $A: $restarts, expected Restarts=1"
[ "$(scontrol show job "$B" | grep -oE 'Restarts=[0-9]+' | head -1)" = Restarts=0 ] || fail "job $B was restarted"

saved=$(grep -oE 'preemption signal: saved .* at global_step=[0-9]+' "$A_LOG" | head -1 | grep -oE '[0-9]+$')
[ "$saved" = "$SIGNAL_AT_STEP" ] || fail "saved at global_step=$saved, expected $SIGNAL_AT_STEP"
# (No check for rank 0's "requeued SLURM job" line: `scontrol requeue` ends the run at once, often before
# it can print. Restarts=1 above and SLURM_RESTART_COUNT=1 in the log are the proof.)
has "$A_LOG" "resuming from $W/a/resume/last.ckpt" || fail "the requeued run did not auto-resume"
[ "$(grep -c "^TRAIN_START global_step=0 batches_done=0 rank=[01] restart=0 " "$A_LOG")" = 2 ] \
  || fail "first run: both ranks must start at step 0"
[ "$(grep -c "^TRAIN_START global_step=$saved batches_done=$saved rank=[01] restart=1 " "$A_LOG")" = 2 ] \
  || fail "requeued run: both ranks must start at global_step=$saved with $saved batches consumed"
[ "$(grep -c "^TRAIN_END global_step=$MAX_STEPS rank=[01] restart=1 " "$A_LOG")" = 2 ] \
  || fail "requeued run: both ranks must end at global_step=$MAX_STEPS"
[ "$(grep -c "^TRAIN_END global_step=$MAX_STEPS rank=[01] restart=0 " "$B_LOG")" = 2 ] \
  || fail "reference: both ranks must end at global_step=$MAX_STEPS"

# Every step 0..MAX_STEPS-1 ran exactly once per rank in A (first run < saved, requeued run >= saved),
# with the batch and learning rate that B used at that step.
steps() { grep -E '^STEP ' "$1" | sed -E 's/ restart=[0-9]+//' | sort -t= -k3,3n -k2,2n; }
steps "$A_LOG" > "$W/a_steps"; steps "$B_LOG" > "$W/b_steps"
[ "$(wc -l < "$W/b_steps")" = $(( 2 * MAX_STEPS )) ] || fail "reference ran $(wc -l < "$W/b_steps") rank-steps"
[ "$(grep -cE "^STEP rank=[01] restart=0 global_step=([0-9]+) " "$A_LOG")" = $(( 2 * saved )) ] \
  || fail "first run of $A must run steps 0..$(( saved - 1 )) on both ranks"
diff "$W/a_steps" "$W/b_steps" > "$W/steps.diff" \
  || { cat "$W/steps.diff"; fail "interrupted and reference runs differ in steps, batches or LR (diff above)"; }

# Final adapters: written once by rank 0 of the finished run, equal within float32 tolerance.
"$PY" - "$W/a/adapter/adapter.safetensors" "$W/b/adapter/adapter.safetensors" <<'PYEOF' || fail "adapters differ"
import sys
import numpy as np
from safetensors.numpy import load_file  # numpy, not torch: a second or two less on a small machine
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert a.keys() == b.keys() and a, f"different tensors: {sorted(a.keys() ^ b.keys())}"
diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
moved = max(float(np.abs(b[k]).max()) for k in b if "lora_B" in k)  # B starts at 0: training changed it
print(f"adapter: {len(a)} tensors, max |interrupted - reference| = {diff:.3g}, max |lora_B| = {moved:.3g}")
assert moved > 0, "the reference adapter did not train (lora_B is still 0)"
for k in a:  # float32 tolerance (the same as torch.testing.assert_close's defaults for float32)
    assert np.allclose(a[k], b[k], rtol=1.3e-6, atol=1e-5), f"{k}: max diff {np.abs(a[k] - b[k]).max()}"
PYEOF

cpu() { grep -oE "^TRAIN_END .* restart=$2 cpu_s=[0-9.]+" "$1" | grep -oE '[0-9.]+$' | sort -n | tail -1; }
say "adapters equal. CPU seconds of the busiest rank up to the end of training (imports included):" \
    "job $A first run $(cpu "$A_LOG" 0), requeued run $(cpu "$A_LOG" 1); job $B $(cpu "$B_LOG" 0)"
say "now the jobs that must fail fast with one clear line"

# ---- 5. jobs that must fail at startup with a clear message instead of hanging or resuming the wrong run
FIT=("${CMD[@]}" fit --config "$HERE/tiny_cpu.yaml" --data.train_file "$W/words.jsonl")
quote() { printf '%q ' "$@"; }
# C: a new job with B's default_root_dir must not silently take over B's (finished) run
C=$(submit litpeft-requeue-c "$W/c.log" "$W/b")
# D: 2 srun tasks, but the Trainer told devices=1 (a hand-written job script)
D=$(cd "$W" && sbatch --parsable --job-name=litpeft-layout-d --output="$W/d.log" --ntasks-per-node=2 \
    --wrap "srun --kill-on-bad-exit=1 $(quote "${FIT[@]}") --trainer.devices=1 --trainer.default_root_dir $W/d")
# E: a 2-task job that runs litpeft without srun
E=$(cd "$W" && sbatch --parsable --job-name=litpeft-layout-e --output="$W/e.log" --ntasks-per-node=2 \
    --wrap "$(quote "${FIT[@]}") --trainer.devices=2 --trainer.default_root_dir $W/e")
D=${D%%;*} E=${E%%;*}
wait_for 300 "jobs $C $D $E to finish" eval 'gone "$C" && gone "$D" && gone "$E"'
expect_failure() {  # expect_failure JOB LOG PATTERN
  local info; info=$(scontrol show job "$1")
  grep -q 'JobState=FAILED' <<< "$info" || fail "job $1 should have failed: $(grep -oE 'JobState=[A-Z_]+' <<< "$info")"
  grep -qE "litpeft: error: .*$3" "$2" || { tail -n 30 "$2"; fail "job $1: no clear error matching '$3'"; }
  say "job $1 failed as expected: $(grep -m1 -oE "litpeft: error: .{0,110}" "$2")..."
}
expect_failure "$C" "$W/c.log" "written by SLURM job $B, not by this job \\($C\\)"
expect_failure "$D" "$W/d.log" "job step has 2 tasks .*expects devices=1 x num_nodes=1"
expect_failure "$E" "$W/e.log" "not started by .srun."

say "PASS: job $A saved at step $saved, requeued (Restarts=1), resumed at step $saved with the same" \
    "batches and LR as job $B, finished at step $MAX_STEPS; final adapters equal; bad jobs fail fast"
