"""PeftLM: the loss, adapter-only checkpoints, and resuming with the same loss curve."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from litpeft import InstructionDataModule, LoRA, PeftLM
from litpeft.adapter_dir import load_adapter


def _module(**kwargs) -> PeftLM:
    module = PeftLM(model="tiny:llama", method=LoRA(r=4, alpha=8), **kwargs)
    module.optimizer_init = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}}
    module.lr_scheduler_init = {
        "class_path": "litpeft.schedulers.WarmupCosine",
        "init_args": {"warmup_steps": 2, "total_steps": None},
    }
    return module


def test_loss_equals_hf_loss_on_unmasked_positions() -> None:
    """Our head-only-on-loss-positions loss must equal transformers' own full-logits loss."""
    module = _module()
    module.configure_model()
    tok = module.tokenizer
    ids = torch.tensor(
        [tok("what is this? it is a test").input_ids, tok("another row, also here ok!").input_ids]
    )
    labels = ids.clone()
    labels[:, :8] = -100
    mask = torch.ones_like(ids)
    loss, acc, n = module.loss_and_accuracy({"input_ids": ids, "labels": labels, "attention_mask": mask})
    reference = module.model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    assert n == int((labels[:, 1:] != -100).sum())
    assert 0.0 <= acc.item() <= 1.0


class _RecordLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


class _Interrupt(L.Callback):
    """Stops the run after ``step`` optimizer steps, as a preempted job would (same config otherwise)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _fit(
    data: Path, root: Path, max_steps: int, ckpt_path: str | None = None, stop_at: int | None = None
) -> tuple[_RecordLosses, PeftLM]:
    L.seed_everything(0)
    record = _RecordLosses()
    extra = [_Interrupt(stop_at)] if stop_at else []
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=root,
        callbacks=[
            record,
            L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True),
            *extra,
        ],
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    module = _module(adapter_dir=str(root / "adapter"))
    dm = InstructionDataModule(train_file=str(data), val_fraction=0.0, batch_size=4, max_seq_length=64)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return record, module


def test_checkpoint_holds_only_trainable_tensors(word_data: Path, tmp_path: Path) -> None:
    _, module = _fit(word_data, tmp_path, max_steps=2)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable
    assert all(".lora_" in k for k in ckpt["state_dict"])
    assert ckpt["litpeft"]["method"]["init_args"]["r"] == 4


def test_resume_mid_epoch_continues_the_same_loss_curve(word_data: Path, tmp_path: Path) -> None:
    # 24 rows, batch 4: 6 batches per epoch. Stop at step 4 (mid-epoch), resume to step 9 (into epoch 2).
    full, full_module = _fit(word_data, tmp_path / "full", max_steps=9)
    first, _ = _fit(word_data, tmp_path / "part", max_steps=9, stop_at=4)
    second, resumed = _fit(
        word_data, tmp_path / "part", max_steps=9, ckpt_path=str(tmp_path / "part/ckpt/last.ckpt")
    )
    assert len(full.losses) == 9 and len(first.losses) == 4 and len(second.losses) == 5
    torch.testing.assert_close(
        torch.tensor(first.losses + second.losses), torch.tensor(full.losses), rtol=1e-5, atol=1e-6
    )
    assert resumed.trainer.global_step == 9
    for (n, a), b in zip(full_module.named_parameters(), resumed.parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a, b, msg=n)


def test_fit_writes_a_loadable_adapter_directory(word_data: Path, tmp_path: Path) -> None:
    _, module = _fit(word_data, tmp_path, max_steps=3)
    model, tok, method, style = load_adapter(tmp_path / "adapter")
    x = torch.tensor([tok("hello").input_ids])
    module.model.eval()
    torch.testing.assert_close(model(x).logits, module.model(x).logits)
    assert isinstance(method, LoRA) and method.r == 4
    assert style.name == "chat_template"


def test_configure_model_uses_cpu_attention_with_the_same_logits() -> None:
    module = _module()
    module.configure_model()
    assert module.model.config._attn_implementation == "litpeft_cpu_sdpa"
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = module.model(input_ids=ids, attention_mask=mask).logits
        module.model.set_attn_implementation("sdpa")
        theirs = module.model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real].float(), theirs[real].float(), rtol=3e-2, atol=3e-2)


def test_right_padding_mask_is_dropped_with_the_same_loss() -> None:
    """A right-padded batch trains without its mask; the loss equals transformers' full loss with it."""
    module = _module()
    module.configure_model()
    ids = torch.randint(0, 250, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    assert "attention_mask" not in module.without_padding_mask(batch)
    loss, _, _ = module.loss_and_accuracy(module.without_padding_mask(batch))
    reference = module.model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    left = {**batch, "attention_mask": mask.flip(1)}
    assert module.without_padding_mask(left)["attention_mask"] is left["attention_mask"]
