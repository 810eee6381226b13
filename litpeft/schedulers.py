"""Learning-rate schedules stepped once per optimizer step."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.cli import instantiate_class
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from litpeft.errors import check


class WarmupCosine(LambdaLR):
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` x the base LR.

    ``total_steps=None`` takes the trainer's estimated number of optimizer steps (see :func:`build_lr_scheduler`).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
    ) -> None:
        check(warmup_steps >= 0, "warmup_steps", warmup_steps, "a number of steps, 0 or more", "scheduler")
        check(
            0 <= min_lr_ratio <= 1,
            "min_lr_ratio",
            min_lr_ratio,
            "a fraction of the base LR in [0, 1]",
            "scheduler",
        )
        check(
            total_steps is None or total_steps > 0,
            "total_steps",
            total_steps,
            "a positive integer or null",
            "scheduler",
        )
        if total_steps is None:
            raise ValueError(
                "WarmupCosine needs total_steps (build it with build_lr_scheduler to take the trainer's)"
            )
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: Optimizer, init: dict[str, Any], trainer: L.Trainer) -> LRScheduler:
    """The scheduler ``{class_path, init_args}`` over ``optimizer``.

    An argument ``total_steps`` left at ``None`` (:class:`WarmupCosine`, torch's ``OneCycleLR``) becomes
    the trainer's estimated number of optimizer steps.
    """
    args = init.get("init_args", {})
    if "total_steps" in args and args["total_steps"] is None:
        init = {**init, "init_args": {**args, "total_steps": int(trainer.estimated_stepping_batches)}}
    return instantiate_class(optimizer, init)
