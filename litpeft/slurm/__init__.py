"""SLURM support: preemption checkpoint + requeue, resume-if-present, and a job-layout check.

Lightning's built-in SLURM auto-requeue (``SLURMEnvironment(auto_requeue=True)``, the default) saves the
checkpoint *inside* the signal handler, which can hang on a collective or leave a truncated file
(lightning#21406); ``ckpt_path="hpc"`` fails on a first run that has no checkpoint yet (lightning#20347);
and a mismatch between ``--ntasks-per-node`` and ``Trainer(devices=...)`` hangs instead of failing.
This module replaces those pieces:

* :class:`PreemptionCheckpoint` -- a callback whose signal handler only sets a flag; at the next
  optimizer step all ranks agree on the flag, write ``<dirpath>/last.ckpt`` atomically, rank 0 runs
  ``scontrol requeue $SLURM_JOB_ID`` and the trainer stops. It switches Lightning's own auto-requeue
  off (also available explicitly via :func:`slurm_plugins`) so that two handlers never fight.
* :func:`find_resume_checkpoint` / :func:`auto_resume_checkpoint` -- ``ckpt_path`` for
  resume-if-present: ``None`` on a first run, the callback's checkpoint on a requeued one.
* :func:`check_slurm_layout` -- raises :class:`SlurmLayoutError` naming both numbers when the SLURM
  job's tasks disagree with ``devices x num_nodes``.

Wiring into a LightningCLI subclass::

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        check_slurm_layout(trainer)  # fail fast instead of hanging in the DDP setup
        if is_slurm_job() and not any(isinstance(c, PreemptionCheckpoint) for c in trainer.callbacks):
            trainer.callbacks.append(PreemptionCheckpoint())
        return trainer

    def before_fit(self):
        cfg = self.config_init[self.subcommand]
        if cfg.get("ckpt_path") is None:  # no --ckpt_path given: resume if a checkpoint is there
            cfg["ckpt_path"] = auto_resume_checkpoint(self.trainer)

Submit with ``#SBATCH --signal=USR1@90 --requeue --open-mode=append`` (see scripts/slurm/*.sbatch).

Modules: :mod:`~litpeft.slurm.environment` (is this a SLURM task, the job id, Lightning's plugin),
:mod:`~litpeft.slurm.topology` (the layout check), :mod:`~litpeft.slurm.checkpoint` (the atomic write and
the job marker), :mod:`~litpeft.slurm.callback` (:class:`PreemptionCheckpoint`, :func:`was_preempted`),
:mod:`~litpeft.slurm.resume` (resume-if-present). Import the names from ``litpeft.slurm``.
"""

from litpeft.slurm.callback import DEFAULT_REQUEUE_COMMAND, PreemptionCheckpoint, was_preempted
from litpeft.slurm.checkpoint import DEFAULT_FILENAME, atomic_save_checkpoint
from litpeft.slurm.environment import is_slurm_job, slurm_job_id, slurm_plugins
from litpeft.slurm.resume import SlurmResumeError, auto_resume_checkpoint, find_resume_checkpoint
from litpeft.slurm.topology import SlurmLayoutError, check_slurm_layout, slurm_layout_error

__all__ = [
    "DEFAULT_FILENAME",
    "DEFAULT_REQUEUE_COMMAND",
    "PreemptionCheckpoint",
    "SlurmLayoutError",
    "SlurmResumeError",
    "atomic_save_checkpoint",
    "auto_resume_checkpoint",
    "check_slurm_layout",
    "find_resume_checkpoint",
    "is_slurm_job",
    "slurm_job_id",
    "slurm_layout_error",
    "slurm_plugins",
    "was_preempted",
]
