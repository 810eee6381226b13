"""Batched generation and the exact-match evaluation callback."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from litpeft import InstructionDataModule, LoRA, PeftLM
from litpeft.generation import ExactMatchEvaluation, exact_match, generate, split_for_generation
from litpeft.models import load_model, load_tokenizer
from tests.conftest import word_rows, write_jsonl


def test_exact_match_normalizes_whitespace_only() -> None:
    assert exact_match([" Paris\n", "paris", "Rome  is"], ["Paris", "Paris", "Rome is"]) == 2 / 3


def test_batched_left_padded_generation_equals_one_by_one() -> None:
    tok, model = load_tokenizer("tiny:llama"), load_model("tiny:llama")
    prompts = ["a", "a much longer prompt here", "mid length"]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert tok.padding_side == "right"  # restored


def test_split_for_generation_uses_the_last_assistant_turn() -> None:
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    prompts, refs = split_for_generation([msgs])
    assert prompts == [msgs[:3]] and refs == ["a2"]


def test_exact_match_callback_reports_base_then_tuned(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", word_rows(12))
    callback = ExactMatchEvaluation(limit=4, max_new_tokens=4)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    module = PeftLM(model="tiny:llama", method=LoRA(r=2))
    trainer.fit(module, InstructionDataModule(train_file=str(data), val_fraction=0.5, batch_size=2))
    assert set(callback.results) == {"base", "tuned"}
    assert all(0.0 <= v <= 1.0 for v in callback.results.values())
    assert not any(p.requires_grad is False and ".lora_" in n for n, p in module.named_parameters())
    assert torch.is_grad_enabled()
