"""The SLURM path for real: scripts/slurm/test_requeue.sh on a throwaway single-node Slurm cluster, and
scripts/slurm/test_multi_node.sh on a throwaway two-node one (two slurmd daemons on this machine).

test_requeue.sh starts slurmctld + slurmd (+ munge) on localhost (installing the Debian packages with apt-get
if they are missing), submits two 2-task gloo-DDP ``litpeft fit`` jobs with scripts/slurm/cpu.sbatch,
preempts one with ``scancel --signal=USR1``, and checks that it requeued itself, resumed at the same step
with the same batches and LR, finished at max_steps, and left the same adapter as the uninterrupted job.
test_multi_node.sh submits the shipped multi_node.sbatch on 2 nodes x 1 task (CPU, gloo) beside
cpu.sbatch on 1 node x 2 tasks and checks that the job ran one rank on each node and that both left the
same adapter. Each script stops only the daemons it started. Needs root (slurmd, apt-get): it fails,
not skips, without it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO

# Starts its own processes on fixed world sizes and times collectives: `make test` runs it alone, not on the xdist workers.
pytestmark = pytest.mark.serial

SCRIPTS = REPO / "scripts" / "slurm"
TIMEOUT_S = 900  # test_requeue.sh takes ~1 min on an idle 2-core machine, 3 min with load average 14


def run_cluster_script(name: str) -> None:
    script = SCRIPTS / name
    assert os.geteuid() == 0, (
        "tests/test_slurm_cluster.py runs a real Slurm cluster (slurmd, apt-get) and needs root; "
        "run it as root (CI does), or deselect it with -m 'not slow'"
    )
    env = {
        **os.environ,
        "PYTHON": sys.executable,  # the interpreter running the tests runs the jobs too
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    for key in [k for k in env if k.startswith("SLURM")]:  # not a job inside whatever runs pytest
        del env[key]
    proc = subprocess.Popen(
        ["bash", str(script)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the script's trap cancel the jobs and stop the daemons it started.
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        pytest.fail(f"{script.name} did not finish in {TIMEOUT_S}s:\n{out[-6000:]}")
    prefix = "[" + script.stem
    progress = "\n".join(line for line in out.splitlines() if line.startswith(prefix))
    assert proc.returncode == 0, (
        f"{script.name} failed (exit {proc.returncode}):\n{progress}\n...\n{out[-8000:]}"
    )
    assert "PASS:" in out, out[-4000:]
    print(progress)  # shown with -rA or -s


@pytest.mark.slow
def test_preempt_requeue_resume_on_a_real_slurm_cluster() -> None:
    run_cluster_script("test_requeue.sh")


@pytest.mark.slow
def test_multi_node_template_on_two_slurm_nodes() -> None:
    """multi_node.sbatch on 2 nodes x 1 task = cpu.sbatch on 1 node x 2 tasks (~1 min on 2 cores)."""
    run_cluster_script("test_multi_node.sh")
