"""The preemption checkpoint on disk: written atomically, with a marker naming the SLURM job that wrote it.

Lightning's built-in SLURM auto-requeue saves inside the signal handler, which can leave a truncated file
(lightning#21406); :func:`atomic_save_checkpoint` writes ``<path>.tmp`` and renames it over ``<path>``
(:func:`litpeft.files.commit`), so a kill at any moment leaves the old or the new checkpoint, never a
partial one. ``<path>.slurm_job`` names the job that wrote it (see :mod:`litpeft.slurm.resume`).
"""

from __future__ import annotations

import contextlib
import os

import lightning.pytorch as pl

from litpeft.files import atomic_path, commit, remove
from litpeft.slurm.environment import slurm_job_id

DEFAULT_FILENAME = "last.ckpt"
#: the temporary name beside the checkpoint: fixed (not per process), as every rank passes it to
#: ``trainer.save_checkpoint``, a collective for sharded strategies
_TMP_SUFFIX = ".tmp"
_JOB_SUFFIX = ".slurm_job"  # next to the checkpoint: the SLURM job that wrote it


def atomic_save_checkpoint(trainer: pl.Trainer, filepath: str | os.PathLike[str]) -> str:
    """Write a checkpoint to ``filepath`` via a temp file + ``os.replace``; call on all ranks.

    ``trainer.save_checkpoint`` (a collective for sharded strategies) writes ``<filepath>.tmp``; then global
    rank 0 fsyncs it and renames it over ``filepath``. A crash or kill at any point leaves either the old
    complete checkpoint or the new one, never a partial file under ``filepath``. Returns ``filepath``.
    Local filesystems only (``os.replace``); use a shared filesystem for multi-node jobs.
    """
    path = os.fspath(filepath)
    if "://" in path:
        raise ValueError(f"atomic_save_checkpoint needs a local/shared filesystem path, got {path!r}")
    tmp = path + _TMP_SUFFIX
    strategy = trainer.strategy
    if trainer.is_global_zero:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        remove(tmp)  # stale temp file of an interrupted save
    strategy.barrier("litpeft_atomic_save_pre")
    try:
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            # A sharded checkpoint is a directory: commit moves the old one aside to `<path>.old` first.
            commit(tmp, path, fsync=True)
    except BaseException:
        if trainer.is_global_zero:
            with contextlib.suppress(OSError):
                remove(tmp)
        raise
    strategy.barrier("litpeft_atomic_save_post")
    return path


def write_job_marker(path: str) -> None:
    """Write ``<path>.slurm_job``: the SLURM job id of this process (empty outside SLURM)."""
    with atomic_path(path + _JOB_SUFFIX) as tmp:
        tmp.write_text((slurm_job_id() or "") + "\n", encoding="utf-8")


def job_marker(path: str) -> str | None:
    """The SLURM job id in ``<path>.slurm_job`` (``""``: not a SLURM job), ``None`` without a marker."""
    try:
        with open(path + _JOB_SUFFIX, encoding="utf-8") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None
