"""Checkpoint files that are complete or absent: :class:`AtomicCheckpointIO`.

Lightning's default ``TorchCheckpointIO`` writes a local checkpoint through an fsspec transaction, i.e. a
file in the system temp directory that is then moved over the target; when that temp directory is on
another filesystem the move is a copy, and a full disk or a kill during the copy leaves a truncated
``last.ckpt`` (resuming from it is a traceback). Here the checkpoint goes to a temporary sibling in its own
directory, is fsynced and renamed over the target (:func:`litpeft.files.write_atomic`).
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from litpeft.files import write_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic; remote URLs (``s3://``...) go to Lightning's.

    A failed save (disk full, quota) leaves the previous checkpoint under the same name and raises
    :class:`~litpeft.files.DiskWriteError`, which the CLI prints as one line.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        path = os.fspath(path)
        if storage_options is not None or "://" in path:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_atomic(path, lambda f: torch.save(checkpoint, f), what="checkpoint")


def use_atomic_checkpoints(trainer: pl.Trainer) -> None:
    """Make the Trainer's strategy save through :class:`AtomicCheckpointIO`, unless the user chose a
    checkpoint plugin of their own (anything but the plain default)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
