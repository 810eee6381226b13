"""The job-layout check: SLURM's tasks must match the Trainer's ``devices`` x ``num_nodes``.

A mismatch between ``--ntasks-per-node`` and ``Trainer(devices=...)`` hangs in the process-group setup
instead of failing; :func:`check_slurm_layout` raises :class:`SlurmLayoutError` naming both numbers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment

from litpeft.errors import LitPeftError
from litpeft.slurm.environment import cluster_environment, is_slurm_job


class SlurmLayoutError(LitPeftError, ValueError):
    """The SLURM job's task layout does not match the Trainer's ``devices`` x ``num_nodes``."""


def _parse_tasks_per_node(value: str) -> list[int]:
    """Expand SLURM's compressed counts: ``"2"``, ``"2(x3)"``, ``"2(x2),1"`` -> per-node task counts."""
    counts: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(f"cannot parse SLURM tasks-per-node value {value!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def slurm_layout_error(devices: int, num_nodes: int, environ: Mapping[str, str] | None = None) -> str | None:
    """Return why ``devices`` x ``num_nodes`` cannot run in this SLURM job step, or ``None`` if it fits.

    Outside SLURM (or in an interactive ``bash``/``interactive`` allocation) this returns ``None``.
    """
    env = os.environ if environ is None else environ
    if not is_slurm_job(env):
        return None
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    nnodes_raw = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
    nnodes = int(nnodes_raw) if nnodes_raw else None
    per_node_raw = (
        env.get("SLURM_STEP_TASKS_PER_NODE")
        or env.get("SLURM_NTASKS_PER_NODE")
        or env.get("SLURM_TASKS_PER_NODE")
    )
    per_node = _parse_tasks_per_node(per_node_raw) if per_node_raw else None
    expected = devices * num_nodes
    fix = (
        "Each Lightning process is one SLURM task, so --ntasks-per-node must equal trainer.devices and "
        "--nodes must equal trainer.num_nodes."
    )
    if ntasks > 1 and "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        return (
            f"This process runs in the SLURM batch step of a job with {ntasks} tasks, but it was not started by "
            f"`srun`, so only 1 of the {ntasks} processes exists and DDP would wait for the others forever. "
            "Launch it as `srun litpeft fit ...` inside the sbatch script."
        )
    if per_node is not None and len(set(per_node)) > 1:
        return (
            f"SLURM placed an uneven number of tasks per node ({per_node_raw}); Lightning needs the same number on "
            "every node. Use `#SBATCH --ntasks-per-node=N` instead of `--ntasks`. " + fix
        )
    tasks_per_node = per_node[0] if per_node else None
    if (
        ntasks != expected
        or (tasks_per_node is not None and tasks_per_node != devices)
        or (nnodes is not None and nnodes != num_nodes)
    ):
        job = f"{ntasks} tasks"
        if nnodes is not None and tasks_per_node is not None:
            job += f" (--nodes={nnodes} x --ntasks-per-node={tasks_per_node})"
        want_nodes = nnodes if nnodes is not None else num_nodes
        want_devices = tasks_per_node if tasks_per_node is not None else max(ntasks // max(want_nodes, 1), 1)
        return (
            f"SLURM job layout does not match the Trainer: the job step has {job}, but the Trainer expects "
            f"devices={devices} x num_nodes={num_nodes} = {expected} processes. {fix} Either set "
            f"trainer.devices={want_devices} and trainer.num_nodes={want_nodes}, or submit with "
            f"#SBATCH --nodes={num_nodes} --ntasks-per-node={devices}."
        )
    return None


def check_slurm_layout(trainer: pl.Trainer, environ: Mapping[str, str] | None = None) -> None:
    """Raise :class:`SlurmLayoutError` if the Trainer does not fit the SLURM job it runs in.

    Call it right after building the Trainer, before ``fit``: the mismatch otherwise shows up as a hang in
    the process-group setup. A no-op outside SLURM or when the Trainer does not use ``SLURMEnvironment``.
    """
    env = cluster_environment(trainer)
    if env is not None and not isinstance(env, SLURMEnvironment):
        return
    msg = slurm_layout_error(trainer.num_devices, trainer.num_nodes, environ)
    if msg is not None:
        raise SlurmLayoutError(msg)
