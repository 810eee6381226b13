"""Prompt tuning's and P-tuning's trainables are fp32 under ``bf16-true`` (issue #16, defect 2): the
base is bf16 through Lightning's precision path, the adapter keeps fp32 master weights, and one AdamW
step moves every one of them (a bf16 weight near 1 would not move at this LR: its spacing is 2^-8)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from litpeft.data import InstructionDataModule
from litpeft.methods import PeftMethod, PromptTuning, PTuning
from litpeft.module import PeftLM

METHODS = {
    "prompt_tuning": lambda: PromptTuning(num_virtual_tokens=4, init="vocab"),
    "p_tuning_lstm": lambda: PTuning(num_virtual_tokens=4, encoder="lstm", encoder_hidden_size=16),
    "p_tuning_mlp": lambda: PTuning(num_virtual_tokens=4, encoder="mlp", encoder_hidden_size=16),
}


def fit_one_step(
    tmp_path: Path, method: PeftMethod, precision: str
) -> tuple[PeftLM, dict[str, torch.Tensor]]:
    """One AdamW step (lr 1e-4) of ``method`` on ``tiny:llama`` under ``precision``; the trainables before."""
    rows = [{"instruction": f"Say {w}.", "output": w} for w in ["alpha", "gamma", "delta", "omega"]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    L.seed_everything(0)
    module = PeftLM("tiny:llama", method=method, adapter_dir=str(tmp_path / "adapter"))
    module.optimizer_init = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-4}}
    data = InstructionDataModule(train_file=str(tmp_path / "train.jsonl"), val_fraction=0.25, batch_size=2)
    before: dict[str, torch.Tensor] = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: PeftLM) -> None:
            before.update({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})

    trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,  # a validation pass first, as fit runs it
        default_root_dir=str(tmp_path),
        callbacks=[Snapshot()],
    )
    trainer.fit(module, datamodule=data)
    return module, before


@pytest.mark.parametrize("name", list(METHODS))
def test_bf16_true_trains_fp32_soft_prompts(tmp_path: Path, name: str) -> None:
    module, before = fit_one_step(tmp_path, METHODS[name](), "bf16-true")
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and set(trainable) == set(before)
    assert module.model.get_input_embeddings().weight.dtype == torch.bfloat16  # the base is bf16
    for n, p in trainable.items():
        assert p.dtype == torch.float32, n
        assert before[n].dtype == torch.float32, n  # fp32 from the start, not cast up later
        assert not torch.equal(p, before[n]), f"{n} did not move"
    state = module.trainer.optimizers[0].state
    for p in trainable.values():
        assert state[p]["exp_avg"].dtype == state[p]["exp_avg_sq"].dtype == torch.float32
