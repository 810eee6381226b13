"""``--ckpt_path last``: one checkpoint directory per run, and its newest complete checkpoint.

Lightning puts a ``ModelCheckpoint`` without a ``dirpath`` into the logger's ``version_N/checkpoints``,
and a new process gets a new ``version_N``: ``--ckpt_path last`` then looks in an empty directory, warns
and trains from step 0. Here every such ``ModelCheckpoint`` writes to ``<default_root_dir>/checkpoints``
(the same for every restart of the run), ``last`` means the newest checkpoint that loads among all of the
run's checkpoint files (so a kill between the step file and ``last.ckpt`` loses nothing), and an explicit
resume that finds none is an error instead of a fresh run. :func:`run_dir` is where the run's
``config.yaml`` and adapter go.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from litpeft.checkpoint_io import use_atomic_checkpoints
from litpeft.errors import LitPeftError
from litpeft.run_lock import RunLockCallback
from litpeft.slurm import PreemptionCheckpoint

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STOPPED_BY_SIGTERM = (
    "litpeft: error: stopped by SIGTERM before the end; its checkpoints are kept: "
    "continue with the same command and --ckpt_path last"
)


class NoCheckpointError(LitPeftError):
    """``--ckpt_path last`` found no checkpoint to resume."""


def stable_checkpoint_dirs(trainer: pl.Trainer) -> list[Path]:
    """Give every ``ModelCheckpoint`` without a ``dirpath`` ``<default_root_dir>/checkpoints``; return
    the directories that hold the run's checkpoints (those and the preemption checkpoint's)."""
    dirs: list[Path] = []
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint):
            if cb.dirpath is None:
                cb.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, CHECKPOINT_DIR))
            dirs.append(Path(cb.dirpath))
        elif isinstance(cb, PreemptionCheckpoint):
            dirs.append(Path(cb.resolve_dirpath(trainer)))
    return list(dict.fromkeys(dirs))


def run_dir(trainer: pl.Trainer) -> str:
    """Where a fit writes ``config.yaml`` and the adapter: ``trainer.log_dir`` (TensorBoard's or CSV's
    ``version_N``; ``default_root_dir`` without a logger), else ``default_root_dir``. For other loggers
    Lightning's ``log_dir`` is their ``save_dir``: W&B's is the working directory (every run's adapter in
    one ``./adapter``), MLflow's ``./mlruns`` (inside its store) or ``None`` (a database or server URI)."""
    if trainer.logger is None or isinstance(trainer.logger, (TensorBoardLogger, CSVLogger)):
        return str(trainer.log_dir)  # broadcasts from rank 0 under DDP/FSDP: every rank must ask for it
    return trainer.default_root_dir


def checkpoint_step(path: str | os.PathLike[str]) -> int | None:
    """The ``global_step`` saved in ``path``, or ``None`` if it does not load (truncated, not a checkpoint)."""
    path = Path(path)
    try:
        if path.is_dir():  # a sharded checkpoint (torch.distributed.checkpoint): the loop state is in meta.pt
            return int(torch.load(path / "meta.pt", map_location="cpu", weights_only=True)["global_step"])
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["global_step"])
    except Exception:  # any unreadable file is skipped: a resume never starts from it
        return None


def find_last_checkpoint(dirs: list[Path]) -> tuple[Path, int] | None:
    """The newest checkpoint file (modification time) that loads in ``dirs``, with its step.

    Hidden files (an interrupted save's temporary copy) are never candidates.
    """
    files = [p for d in dirs if d.is_dir() for p in d.glob("*.ckpt")]
    for path in sorted(files, key=lambda p: p.stat().st_mtime_ns, reverse=True):
        step = checkpoint_step(path)
        if step is not None:
            return path, step
        log.warning("skipping %s: not a complete checkpoint", path)
    return None


def resolve_ckpt_path(trainer: pl.Trainer, ckpt_path: str | None) -> str | None:
    """``fit``'s ``ckpt_path`` with ``last`` replaced by the run's newest checkpoint (printed).

    Raises :class:`NoCheckpointError` when ``last`` finds none. Without ``ckpt_path``, a run directory that
    already holds checkpoints gets a note: this run starts from step 0 (its checkpoints become the newest).
    """
    dirs = stable_checkpoint_dirs(trainer)
    if ckpt_path != "last":
        if ckpt_path is None and trainer.is_global_zero and find_last_checkpoint(dirs) is not None:
            log.warning(
                "note: %s holds checkpoints of an earlier run; this run starts from step 0 "
                "(to continue that run instead: --ckpt_path last)",
                ", ".join(map(str, dirs)),
            )
        return ckpt_path
    found = find_last_checkpoint(dirs)
    if found is None:
        where = (
            ", ".join(map(str, dirs))
            or f"{trainer.default_root_dir} (the trainer has no checkpoint callback)"
        )
        raise NoCheckpointError(
            f"--ckpt_path last: no checkpoint to resume in {where}; "
            "drop --ckpt_path to start a new run, or set trainer.default_root_dir to the run's directory"
        )
    path, step = found
    if trainer.is_global_zero:
        print(f"litpeft: resuming from {path} (step {step})", flush=True)
    return str(path)


def make_resumable(trainer: pl.Trainer) -> None:
    """What ``litpeft fit`` adds to a Trainer: atomic checkpoint files, one checkpoint directory per run,
    and the run-directory lock (first among the callbacks, so a second fit stops before writing)."""
    use_atomic_checkpoints(trainer)
    dirs = stable_checkpoint_dirs(trainer)
    if not any(isinstance(cb, RunLockCallback) for cb in trainer.callbacks):
        trainer.callbacks.insert(0, RunLockCallback(cleanup_dirs=dirs))


def lock_run(trainer: pl.Trainer) -> None:
    """Take the run-directory lock now (global rank 0), before ``fit`` writes anything in the directory."""
    for cb in trainer.callbacks:
        if isinstance(cb, RunLockCallback):
            cb.acquire(trainer)
