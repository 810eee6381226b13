"""Resume-if-present: the ``ckpt_path`` for ``fit``: ``None`` on a first run, the checkpoint on a requeue.

``ckpt_path="hpc"`` fails on a first run that has no checkpoint yet (lightning#20347);
:func:`auto_resume_checkpoint` finds the :class:`~litpeft.slurm.PreemptionCheckpoint` file instead, and
refuses one that another SLURM job wrote.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from litpeft.errors import LitPeftError
from litpeft.slurm.callback import PreemptionCheckpoint
from litpeft.slurm.checkpoint import DEFAULT_FILENAME, job_marker
from litpeft.slurm.environment import slurm_job_id


def find_resume_checkpoint(
    dirpath: str | os.PathLike[str] | None, filename: str = DEFAULT_FILENAME
) -> str | None:
    """Return ``<dirpath>/<filename>`` if a complete checkpoint is there, else ``None`` (start fresh).

    Pass the result as ``ckpt_path``: the first run gets ``None`` and starts from scratch, a requeued run
    resumes (Lightning restores global_step, epoch and the loops' progress). Left-over ``*.tmp`` files from
    an interrupted save are never returned: :func:`~litpeft.slurm.atomic_save_checkpoint` only renames
    complete files.
    """
    if dirpath is None:
        return None
    path = os.path.join(os.fspath(dirpath), filename)
    if os.path.isfile(path):
        return path if os.path.getsize(path) > 0 else None
    if os.path.isdir(path):  # sharded (distributed) checkpoints are directories
        return path if os.listdir(path) else None
    return None


class SlurmResumeError(LitPeftError, RuntimeError):
    """The resume checkpoint in the run directory belongs to another SLURM job."""


def _check_same_job(path: str) -> None:
    """Raise :class:`SlurmResumeError` if ``path`` was written by another SLURM job than this one.

    A requeued job keeps its job id, so it resumes its own checkpoint. A *new* job that finds another
    job's checkpoint (the same config submitted twice, another learning rate on the command line) would
    otherwise silently continue -- or, for a finished run, end at once and hand back the old adapter.
    A checkpoint without the marker file (put there by hand) is resumed.
    """
    owner = job_marker(path)
    if owner is None:
        return
    current = slurm_job_id() or ""
    if owner != current:
        raise SlurmResumeError(
            f"{path} was written by SLURM job {owner or '(none: not a SLURM job)'}, not by this job "
            f"({current or 'not a SLURM job'}); only a requeued job resumes by itself. To continue that run, "
            f"pass --ckpt_path {path} (or, for chained jobs, set resume_other_jobs: true on "
            "litpeft.slurm.PreemptionCheckpoint); to start a new run, set another trainer.default_root_dir."
        )


def _written_by_this_requeued_job(path: str) -> bool:
    """Whether this is a requeued SLURM job (``SLURM_RESTART_COUNT`` > 0) and it wrote ``path`` itself."""
    job = slurm_job_id()
    if not job or int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0:
        return False
    return job_marker(path) == job


def auto_resume_checkpoint(trainer: pl.Trainer, ckpt_path: str | None = None) -> str | None:
    """The ``ckpt_path`` to pass to ``fit``: resume-if-present for the :class:`PreemptionCheckpoint` file.

    Without an explicit ``ckpt_path``: the callback's checkpoint if present, else ``None`` (start fresh).
    Raises :class:`SlurmResumeError` when that checkpoint was written by another SLURM job (a requeued
    job keeps its id) unless the callback has ``resume_other_jobs``. With an explicit ``ckpt_path`` (a
    fine-tune that starts from some checkpoint): that path, except in a requeued job that has written its
    own preemption checkpoint since -- the requeued job's command line still names the old starting point,
    and resuming from it would throw away the work done before the preemption.
    Auto-resume is opt-in (a Trainer without a :class:`PreemptionCheckpoint` gets ``ckpt_path`` back) and
    off for a ``fast_dev_run``.
    """
    if trainer.fast_dev_run:
        return ckpt_path
    for cb in trainer.callbacks:
        if isinstance(cb, PreemptionCheckpoint):
            path = find_resume_checkpoint(cb.resolve_dirpath(trainer), cb.filename)
            if path is None:
                return ckpt_path
            if ckpt_path is not None:
                if not _written_by_this_requeued_job(path) or os.path.abspath(ckpt_path) == os.path.abspath(
                    path
                ):
                    return ckpt_path
                rank_zero_info(
                    f"[litpeft.slurm] requeued job: resuming from {path}, not --ckpt_path {ckpt_path}"
                )
                return path
            if not cb.resume_other_jobs:
                _check_same_job(path)
            rank_zero_info(f"[litpeft.slurm] resuming from {path}")
            return path
    return ckpt_path
