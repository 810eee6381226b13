#!/usr/bin/env bash
# End-to-end check of preemption + requeue on a real (throwaway, single-node) Slurm cluster:
#   1. start the cluster (cluster_up.sh), 2. submit scripts/slurm/cpu.sbatch as a 2-task gloo-DDP job
#   running a tiny Lightning script with litpeft.slurm's PreemptionCheckpoint + auto_resume_checkpoint,
#   3. `scancel --signal=USR1` it mid-run, 4. check that it saved, requeued (SLURM_RESTART_COUNT=1),
#   resumed from the checkpoint at the same global_step and finished exactly at max_steps,
#   5. stop the cluster (cluster_down.sh) -- also on failure.
#
#   sudo scripts/slurm/test_requeue.sh [WORK_DIR]        # ~1-2 min; needs root (slurmd)
#
# Env: PYTHON (default: .venv/bin/python or python3), MAX_STEPS (40), SIGNAL_AT_STEP (8), KEEP=1 keeps
# WORK_DIR. Exit 0 = pass.
# TODO(litpeft): switch the job command to `litpeft fit --config <tiny cpu config>` once the core lands.
set -euo pipefail
T0=$(date +%s)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
W=${1:-$(mktemp -d /tmp/litpeft-requeue.XXXXXX)}
mkdir -p "$W"; W=$(cd "$W" && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
MAX_STEPS=${MAX_STEPS:-40}
SIGNAL_AT_STEP=${SIGNAL_AT_STEP:-8}
LOG=$W/job.log
JOB=""

say() { echo "[test_requeue +$(( $(date +%s) - T0 ))s] $*"; }
fail() {
  say "FAIL: $*"
  echo "----- job log ($LOG) -----"; cat "$LOG" 2>/dev/null || true
  if [ -n "$JOB" ]; then scontrol show job "$JOB" 2>/dev/null || true; fi
  echo "----- slurm logs -----"; tail -n 20 "$W"/cluster/log/*.log 2>/dev/null || true
  exit 1
}
cleanup() {
  rc=$?
  "$HERE/cluster_down.sh" "$W/cluster" >/dev/null 2>&1 || true
  if [ "$rc" = 0 ] && [ "${KEEP:-0}" != 1 ]; then rm -rf "$W"; fi
  say "cluster stopped (exit $rc)"
}
trap cleanup EXIT

# ---- 1. cluster
eval "$("$HERE/cluster_up.sh" "$W/cluster")"
say "cluster up: SLURM_CONF=$SLURM_CONF"

# ---- 2. the job's training script: BoringModel, 2 ranks (gloo), ~0.2 s per step
cat > "$W/train.py" <<'PYEOF'
import argparse
import os
import time

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.utils.data import DataLoader

from litpeft.slurm import PreemptionCheckpoint, auto_resume_checkpoint, check_slurm_layout

p = argparse.ArgumentParser()
p.add_argument("--root", required=True)
p.add_argument("--max_steps", type=int, default=40)
p.add_argument("--step_sleep", type=float, default=0.2)
p.add_argument("--trainer.accelerator", dest="accelerator", default="cpu")
p.add_argument("--trainer.devices", dest="devices", type=int, default=1)
p.add_argument("--trainer.num_nodes", dest="num_nodes", type=int, default=1)
args = p.parse_args()
rank = os.environ.get("SLURM_PROCID", "0")


class Model(BoringModel):
    def training_step(self, batch, batch_idx):
        time.sleep(args.step_sleep)
        print(f"STEP rank={rank} global_step={self.trainer.global_step} epoch={self.trainer.current_epoch}"
              f" batch_idx={batch_idx}", flush=True)
        return super().training_step(batch, batch_idx)

    def train_dataloader(self):
        return DataLoader(RandomDataset(32, 64), batch_size=4)  # 8 batches per rank per epoch


seed_everything(0)
cb = PreemptionCheckpoint()  # <root>/resume/last.ckpt; requeues via scontrol under SLURM
trainer = Trainer(default_root_dir=args.root, accelerator=args.accelerator, devices=args.devices,
                  num_nodes=args.num_nodes, strategy="ddp", max_steps=args.max_steps, callbacks=[cb],
                  logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0)
check_slurm_layout(trainer)
ckpt = auto_resume_checkpoint(trainer)
print(f"START rank={rank} restart={os.environ.get('SLURM_RESTART_COUNT', '0')} resume_from={ckpt}", flush=True)
trainer.fit(Model(), ckpt_path=ckpt)
print(f"END rank={rank} global_step={trainer.global_step} epoch={trainer.current_epoch}"
      f" preempted={cb.preempted} requeued={cb.requeued}", flush=True)
PYEOF

# ---- 3. submit the project's cpu.sbatch template with this command (2 tasks on 1 node)
JOB=$(cd "$W" && sbatch --parsable --job-name=litpeft-requeue-test --output="$LOG" \
      --export=ALL,PYTHONPATH="$REPO" "$HERE/cpu.sbatch" \
      "$PY" "$W/train.py" --root "$W/run" --max_steps "$MAX_STEPS")
JOB=${JOB%%;*}
say "submitted job $JOB"

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local t=$1 what=$2; shift 2
  for _ in $(seq 1 $(( t * 2 ))); do "$@" && return 0; sleep 0.5; done
  fail "timed out after ${t}s waiting for: $what"
}
log_has() { grep -qE "$1" "$LOG" 2>/dev/null; }
job_gone() { [ -z "$(squeue -h -j "$JOB" 2>/dev/null)" ]; }

wait_for 300 "step $SIGNAL_AT_STEP of the first run" log_has "STEP rank=0 global_step=$SIGNAL_AT_STEP "
say "first run reached step $SIGNAL_AT_STEP; sending SIGUSR1 (scancel --signal=USR1 $JOB)"
scancel --signal=USR1 "$JOB"

wait_for 60 "the preemption checkpoint" log_has "preemption signal: saved"
say "checkpoint saved; waiting for the requeue"
wait_for 180 "the requeued run (SLURM_RESTART_COUNT=1)" log_has "SLURM_RESTART_COUNT=1"
say "requeued; waiting for the job to finish"
wait_for 420 "the requeued run to finish" job_gone
say "job left the queue"

# ---- 4. checks
state=$(scontrol show job "$JOB" | grep -oE 'JobState=[A-Z_]+' | head -1)
restarts=$(scontrol show job "$JOB" | grep -oE 'Restarts=[0-9]+' | head -1)
exitcode=$(scontrol show job "$JOB" | grep -oE ' ExitCode=[0-9:]+' | head -1 | tr -d ' ')
[ "$state" = JobState=COMPLETED ] || fail "job state is $state, expected COMPLETED"
[ "$restarts" = Restarts=1 ] || fail "$restarts, expected Restarts=1"
[ "$exitcode" = ExitCode=0:0 ] || fail "$exitcode, expected ExitCode=0:0"

saved=$(grep -oE 'preemption signal: saved .* at global_step=[0-9]+' "$LOG" | head -1 | grep -oE '[0-9]+$')
[ -n "$saved" ] || fail "no saved step in the log"
[ "$saved" -lt "$MAX_STEPS" ] || fail "saved at $saved, not before max_steps=$MAX_STEPS"
log_has "requeued SLURM job $JOB" || fail "rank 0 did not requeue the job"
[ "$(grep -c '^START rank=[01] restart=0 resume_from=None' "$LOG")" = 2 ] || fail "first run: both ranks must start fresh"
[ "$(grep -cE "^START rank=[01] restart=1 resume_from=$W/run/resume/last.ckpt" "$LOG")" = 2 ] \
  || fail "requeued run: both ranks must resume from $W/run/resume/last.ckpt"
after=$(sed -n '/SLURM_RESTART_COUNT=1/,$p' "$LOG")
first=$(echo "$after" | grep -m1 -oE '^STEP rank=0 global_step=[0-9]+' | grep -oE '[0-9]+$')
[ "$first" = "$saved" ] || fail "requeued run started at global_step=$first, expected $saved"
last=$(grep -oE '^STEP rank=0 global_step=[0-9]+' "$LOG" | tail -1 | grep -oE '[0-9]+$')
[ "$last" = $(( MAX_STEPS - 1 )) ] || fail "last step run was $last, expected $(( MAX_STEPS - 1 ))"
# every step 0..MAX_STEPS-1 ran exactly once on rank 0 across both runs: nothing repeated, nothing skipped
n=$(grep -oE '^STEP rank=0 global_step=[0-9]+' "$LOG" | sort -u | wc -l)
m=$(grep -cE '^STEP rank=0 global_step=[0-9]+' "$LOG")
[ "$n" = "$MAX_STEPS" ] && [ "$m" = "$MAX_STEPS" ] || fail "rank 0 ran $m steps ($n distinct), expected $MAX_STEPS"
[ "$(echo "$after" | grep -c "^END rank=[01] global_step=$MAX_STEPS .*preempted=False")" = 2 ] \
  || fail "requeued run: both ranks must end at global_step=$MAX_STEPS"
say "PASS: saved at step $saved, requeued (Restarts=1), resumed at step $first, finished at $MAX_STEPS"
