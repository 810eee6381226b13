"""In-process checks of the pieces behind the fault suite: the training RNG stream, choosing the
checkpoint to resume, the run-directory lock."""

from __future__ import annotations

import os
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from harness import fault_rows

from litpeft import InstructionDataModule, LoRA, PeftLM
from litpeft.resume import find_last_checkpoint
from litpeft.rng_state import capture_rng, restore_rng
from litpeft.run_lock import RunLock, RunLockedError


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    torch.save(capture_rng(), tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


class _StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def _fit(root: Path, data: Path, stop_at: int | None = None, ckpt_path: str | None = None) -> PeftLM:
    L.seed_everything(0)
    trainer = L.Trainer(
        max_steps=8,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        val_check_interval=3,
        limit_val_batches=2,
        callbacks=[
            L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1),
            *([_StopAt(stop_at)] if stop_at else []),
        ],
    )
    module = PeftLM(model="tiny:llama", method=LoRA(r=4, dropout=0.1), adapter_dir=str(root / "adapter"))
    module.optimizer_init = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}}
    dm = InstructionDataModule(train_file=str(data), val_fraction=0.25, batch_size=2, max_seq_length=48)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return module


def test_resume_with_dropout_is_bit_identical_in_process(tmp_path: Path) -> None:
    """Item 2 of #20: dropout 0.1, validation and a sanity check between the save and the next step."""
    data = tmp_path / "train.jsonl"
    data.write_text(fault_rows())
    full = _fit(tmp_path / "full", data)
    _fit(tmp_path / "part", data, stop_at=4)
    resumed = _fit(tmp_path / "part", data, ckpt_path=str(tmp_path / "part/ckpt/last.ckpt"))
    assert resumed.trainer.global_step == 8
    for (name, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        if a.requires_grad:
            assert torch.equal(a, b), f"{name}: {(a - b).abs().max().item():.3g}"


def test_last_is_the_newest_checkpoint_that_loads(tmp_path: Path) -> None:
    torch.save({"global_step": 3}, tmp_path / "epoch=0-step=3.ckpt")
    torch.save({"global_step": 6}, tmp_path / "epoch=0-step=6.ckpt")
    (tmp_path / "last.ckpt").write_bytes((tmp_path / "epoch=0-step=6.ckpt").read_bytes()[:40])  # truncated
    (tmp_path / ".last.ckpt.tmp123").write_bytes(b"")  # a killed save's temporary
    os.utime(tmp_path / "epoch=0-step=3.ckpt", ns=(1, 1))
    assert find_last_checkpoint([tmp_path]) == (tmp_path / "epoch=0-step=6.ckpt", 6)
    assert find_last_checkpoint([tmp_path / "missing"]) is None


def test_run_lock_names_its_holder_and_is_released(tmp_path: Path) -> None:
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(
        RunLockedError, match=rf"in use by another fit \(pid {os.getpid()} on host .*, started "
    ):
        RunLock(tmp_path).acquire()
    first.release()
    second = RunLock(tmp_path)
    second.acquire()
    assert second.held
    second.release()
