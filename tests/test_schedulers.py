"""Learning-rate schedules: warmup + cosine, and ``total_steps: null`` taken from the trainer."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from litpeft.schedulers import WarmupCosine, build_lr_scheduler


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_warmup_then_cosine_to_the_floor() -> None:
    sched = WarmupCosine(_optimizer(), warmup_steps=3, total_steps=13, min_lr_ratio=0.1)
    assert [sched.factor(s) for s in range(3)] == [0.25, 0.5, 0.75]
    assert sched.factor(3) == 1.0
    assert sched.factor(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert sched.factor(13) == pytest.approx(0.1) and sched.factor(99) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "init",
    [
        {
            "class_path": "litpeft.schedulers.WarmupCosine",
            "init_args": {"warmup_steps": 0, "total_steps": None},
        },
        {
            "class_path": "torch.optim.lr_scheduler.OneCycleLR",
            "init_args": {"max_lr": 1.0, "total_steps": None},
        },
    ],
    ids=["WarmupCosine", "OneCycleLR"],
)
def test_total_steps_left_null_becomes_the_trainers_step_count(init: dict) -> None:
    trainer = SimpleNamespace(estimated_stepping_batches=40)
    assert build_lr_scheduler(_optimizer(), init, trainer).total_steps == 40


def test_an_explicit_total_steps_is_kept() -> None:
    init = {"class_path": "litpeft.schedulers.WarmupCosine", "init_args": {"total_steps": 7}}
    assert (
        build_lr_scheduler(_optimizer(), init, SimpleNamespace(estimated_stepping_batches=40)).total_steps
        == 7
    )


def test_warmup_cosine_without_total_steps_says_how_to_get_them() -> None:
    with pytest.raises(ValueError, match="build_lr_scheduler"):
        WarmupCosine(_optimizer())
