"""A run you can watch: speed and memory at every log step, a step-counting progress bar, a quiet console.

:class:`SpeedMonitor` logs, at each of the trainer's log steps (``log_every_n_steps``), over the optimizer
steps since the previous one:

- ``perf/tokens_per_sec``: tokens of the batches (padding excluded), all ranks together;
- ``perf/loss_tokens_per_sec``: those that carry loss (label not -100: the answers);
- ``perf/mfu``: model FLOPs per second on one device over the device's peak, from Lightning's table
  (:func:`lightning.fabric.utilities.throughput.get_available_flops`); only where the peak is known
  (CUDA GPUs in the table), never on the CPU, which has no such table;
- ``perf/peak_cuda_memory_gb`` (``torch.cuda.max_memory_allocated``) on CUDA, else
  ``perf/peak_rss_gb``, the process's peak resident memory.

``litpeft fit`` adds it (and :class:`StepProgressBar`) to every run; from Python, pass it to the Trainer:
``Trainer(callbacks=[SpeedMonitor()])``.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
from transformers.pytorch_utils import Conv1D

from litpeft.loss import IGNORE_INDEX


def training_flops(model: torch.nn.Module) -> tuple[int, int]:
    """``(per token, per loss token)``: the model FLOPs of one training step, estimated.

    A weight costs 2 FLOPs per token forward and 2 backward for the input gradient (Kaplan et al. 2020,
    C ~ 6N per token), plus 2 for its own gradient only when it is trainable: a frozen base skips that
    third pass, so a PEFT step is ~4N + 2N_trainable. The LM head runs only at loss positions
    (:mod:`litpeft.loss`). Attention's sequence-length term and the embedding lookup are left out.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    def weights(m: torch.nn.Module) -> int:
        if isinstance(m, torch.nn.Linear):  # bitsandbytes' quantized layers too (their packed weight is not)
            return m.in_features * m.out_features
        return m.weight.numel() if isinstance(m, Conv1D) else 0

    dense = sum(weights(m) for m in model.modules() if m is not head)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * dense + 2 * trainable, (4 * weights(head) if head is not None else 0)


def peak_memory(device: torch.device) -> tuple[str, float]:
    """``(name, GB)``: the CUDA allocator's peak on a GPU, else the process's peak resident memory."""
    if device.type == "cuda":
        return "perf/peak_cuda_memory_gb", torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return "perf/peak_rss_gb", rss * (1 if sys.platform == "darwin" else 1024) / 1e9


def device_peak_flops(trainer: L.Trainer) -> int | None:
    """The device's peak FLOP/s in the run's compute dtype, from Lightning's table; None on a CPU (the
    table has no CPUs) or a GPU it does not list."""
    device = trainer.strategy.root_device
    if device.type != "cuda":
        return None
    return get_available_flops(device, _plugin_to_compute_dtype(trainer.precision_plugin))


class SpeedMonitor(Callback):
    """Tokens/s, loss tokens/s, MFU (where the device's peak is known) and peak memory at every log step."""

    def __init__(self) -> None:
        self.peak_flops: int | None = None
        self._flops = (0, 0)
        self._paused: float | None = None
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self._start, self._tokens, self._loss_tokens, self._positions = now, 0, 0, 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak_flops = device_peak_flops(trainer)
        model = getattr(pl_module, "model", pl_module)
        self._flops = training_flops(model)
        self._reset(time.perf_counter())

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            return  # a data module of another shape: nothing to count
        ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
        self._positions += ids.numel()
        # counted on the batch's device, read at log steps only: no host sync per step on a GPU
        self._tokens = self._tokens + (mask.sum() if mask is not None else ids.numel())
        if labels is not None:
            self._loss_tokens = self._loss_tokens + (labels[:, 1:] != IGNORE_INDEX).sum()
        if trainer.fit_loop._should_accumulate() or not trainer._logger_connector.should_update_logs:
            return  # Lightning's ThroughputMonitor asks the same two questions
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the steps' kernels are done: the clock measures them
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        device = trainer.strategy.root_device
        counts = torch.stack([torch.as_tensor(n, device=device) for n in (self._tokens, self._loss_tokens)])
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts.double(), reduce_op="sum")
        counts = counts.double().cpu()
        loss_tokens = float(counts[1])
        tokens_per_sec = float(counts[0]) / elapsed
        metrics = {"perf/loss_tokens_per_sec": loss_tokens / elapsed}
        if self.peak_flops:
            local = float(self._loss_tokens)  # this device's
            flops = self._flops[0] * self._positions + self._flops[1] * local
            metrics["perf/mfu"] = flops / elapsed / self.peak_flops
        name, gb = peak_memory(trainer.strategy.root_device)
        metrics[name] = gb
        pl_module.log("perf/tokens_per_sec", tokens_per_sec, on_step=True, on_epoch=False, prog_bar=True)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self._reset(time.perf_counter())

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._paused is not None:  # validation time is not training time
            self._start += time.perf_counter() - self._paused
            self._paused = None


class StepProgressBar(RichProgressBar):
    """Rich's progress bar over the run's optimizer steps: ``step 37/100`` for a run bounded by
    ``max_steps`` (Lightning's own shows ``Epoch 0/-2`` and the batches of one epoch), ``epoch 2/3`` and
    the run's steps for one bounded by ``max_epochs``."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        epochs = trainer.max_epochs
        if epochs is None or epochs < 0 or trainer.max_steps == trainer.estimated_stepping_batches:
            return "step"
        return f"epoch {current_epoch + 1}/{epochs}"

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.estimated_stepping_batches

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._update(self.train_progress_bar_id, trainer.global_step)


def hyperparameters(tree: Any, prefix: str = "") -> dict[str, Any]:
    """The run's config as flat ``{"model/method/r": 16, ...}`` for every logger's ``log_hyperparams``.

    A ``{class_path, init_args}`` node becomes its class under its own key and its arguments below it
    (``model/method: litpeft.methods.LoRA``); lists are indexed. Flat and short, because MLflow cuts a
    value at 250 characters and TensorBoard's HPARAMS takes scalars and strings only.
    """
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        if "class_path" in tree:
            out[prefix] = tree["class_path"]
            tree = tree.get("init_args") or {}
        for key, value in tree.items():
            out |= hyperparameters(value, f"{prefix}/{key}" if prefix else str(key))
        return out
    if isinstance(tree, list | tuple):
        out = {}
        for i, value in enumerate(tree):
            out |= hyperparameters(value, f"{prefix}/{i}")
        return out
    return {prefix: tree if tree is None or isinstance(tree, int | float | str | bool) else str(tree)}


class _NoTips(logging.Filter):
    """Drops Lightning's advertisements (``💡 Tip: ... try installing litlogger/litmodels``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


def quiet_lightning() -> None:
    """Keep Lightning's promotional tips out of the console (its other messages stay)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())


__all__ = [
    "SpeedMonitor",
    "StepProgressBar",
    "device_peak_flops",
    "peak_memory",
    "quiet_lightning",
    "training_flops",
]
