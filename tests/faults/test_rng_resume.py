"""Item 2 of #20 in one process: a run stopped and resumed with dropout equals the uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from harness import fault_rows

from litpeft import InstructionDataModule, LoRA, PeftLM


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
