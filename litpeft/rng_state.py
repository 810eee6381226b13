"""Exact resume with dropout: the training batches' random stream is part of the checkpoint.

Saving the global RNG states at checkpoint time is not enough: between a checkpoint and the next training
batch an uninterrupted run and a resumed one consume different amounts of randomness (each new DataLoader
iterator draws a base seed, validation may run, the sanity check runs only in the resumed process). So
:class:`TrainingRNG` keeps the random stream that training batches use apart from everything else: at each
training batch's start it swaps that stream in, at its end it saves and swaps it out. The checkpoint holds
the stream as it is after the last saved step, so the next batch draws the same dropout masks in both runs.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

RNGState = dict[str, Any]


def capture_rng() -> RNGState:
    """torch CPU, every CUDA device (if CUDA is in use), Python ``random`` and NumPy's global generator.

    Only tensors and plain Python values, so the checkpoint still loads with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: RNGState = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: RNGState) -> None:
    """Set the generators to ``state`` (from :func:`capture_rng`)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class TrainingRNG(Callback):
    """Training batches draw from their own RNG stream, saved in every checkpoint and restored on resume.

    Under DDP the checkpoint holds global rank 0's stream and every rank resumes with it: Lightning's
    ``seed_everything`` seeds all ranks alike, so their training streams are the same.
    """

    def __init__(self) -> None:
        self._train: RNGState | None = None  # the training stream between batches
        self._other: RNGState | None = None  # everything else's stream, while a batch runs
        self._in_batch = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._other = capture_rng()
        if self._train is not None:
            restore_rng(self._train)
        self._in_batch = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._leave_batch()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._in_batch:
            self._leave_batch()

    def _leave_batch(self) -> None:
        self._train = capture_rng()
        if self._other is not None:
            restore_rng(self._other)
        self._in_batch = False

    def state_dict(self) -> dict[str, Any]:
        # A checkpoint written inside a batch's end hooks (before ours ran) sees the live training stream.
        train = capture_rng() if self._in_batch else self._train
        return {"train": train} if train is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train = state_dict.get("train")
