"""The SLURM environment: is this a SLURM task, which job to requeue, and Lightning's SLURM plugin."""

from __future__ import annotations

import os
import signal as _signal
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment

_INTERACTIVE_JOB_NAMES = ("bash", "interactive")


def is_slurm_job(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a SLURM task that Lightning treats as such (same rule as Lightning).

    Interactive allocations (job name ``bash`` or ``interactive``) are excluded, like in Lightning.
    """
    env = os.environ if environ is None else environ
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in _INTERACTIVE_JOB_NAMES


def slurm_job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The id to requeue: ``<array job>_<task>`` for array jobs, else ``SLURM_JOB_ID``; ``None`` outside SLURM."""
    env = os.environ if environ is None else environ
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return env.get("SLURM_JOB_ID") or None


def parse_signal(value: str | int | _signal.Signals) -> _signal.Signals:
    """Accept ``"SIGUSR1"``, ``"USR1"``, ``10`` or a ``signal.Signals``."""
    if isinstance(value, _signal.Signals):
        return value
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return _signal.Signals(int(value))
    name = value.upper()
    return _signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


def slurm_plugins(
    plugins: Sequence[Any] | Any | None = None,
    requeue_signal: str | int = "SIGUSR1",
    environ: Mapping[str, str] | None = None,
) -> list[Any]:
    """Return ``plugins`` (as a list) with Lightning's SLURM auto-requeue disabled.

    Under SLURM, a ``SLURMEnvironment(auto_requeue=False)`` is appended unless a cluster environment is
    already given; a given ``SLURMEnvironment`` gets ``auto_requeue=False``. Outside SLURM nothing is added
    (a ``SLURMEnvironment`` there would fail reading ``SLURM_NTASKS``). Use as
    ``Trainer(plugins=slurm_plugins(...))``. :class:`~litpeft.slurm.PreemptionCheckpoint` also does this at
    ``setup``.
    """
    if plugins is None:
        out: list[Any] = []
    elif isinstance(plugins, (list, tuple)):
        out = list(plugins)
    else:
        out = [plugins]
    envs = [p for p in out if isinstance(p, ClusterEnvironment)]
    for env in envs:
        if isinstance(env, SLURMEnvironment):
            env.auto_requeue = False
    if not envs and is_slurm_job(environ):
        out.append(SLURMEnvironment(auto_requeue=False, requeue_signal=parse_signal(requeue_signal)))
    return out


def cluster_environment(trainer: pl.Trainer) -> ClusterEnvironment | None:
    """The Trainer's cluster environment (single-device strategies keep it on the accelerator connector)."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    if env is None:
        env = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    return env if isinstance(env, ClusterEnvironment) else None
