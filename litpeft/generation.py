"""Batched generation and generation metrics (exact match), shared by the CLI and the evaluation callback."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from litpeft.data.prompts import Message, PromptStyle
from litpeft.methods import adapters_disabled

log = logging.getLogger(__name__)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    progress: bool = False,
) -> list[str]:
    """Complete already-formatted ``prompts`` in left-padded batches; return the new text of each."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    chunks = list(_chunks(list(prompts), batch_size))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="generating", unit="prompt")
    try:
        for chunk in chunks:
            enc = tokenizer(list(chunk), return_tensors="pt", padding=True, add_special_tokens=False).to(
                model.device
            )
            sampling = (
                {"do_sample": True, "temperature": temperature, "top_p": top_p}
                if do_sample
                else {"do_sample": False}
            )
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
        if bar is not None:
            bar.close()
    return outputs


def normalize(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after whitespace normalization."""
    if not references:
        return float("nan")
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True)) / len(references)


def split_for_generation(samples: Sequence[list[Message]]) -> tuple[list[list[Message]], list[str]]:
    """Each sample's messages up to its last assistant turn, and that turn's text (the reference)."""
    prompts, refs = [], []
    for messages in samples:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append(messages[:last])
        refs.append(messages[last]["content"])
    return prompts, refs


class ExactMatchEvaluation(L.Callback):
    """Greedy-decodes the validation samples before and after ``fit`` and reports exact-match accuracy.

    Before training the adapters are disabled, so the first figure is the base model's own.

    Args:
        limit: evaluate at most this many validation samples (``None``: all).
        max_new_tokens: generation length cap.
        batch_size: prompts per generation batch.
    """

    def __init__(self, limit: int | None = None, max_new_tokens: int = 32, batch_size: int = 16) -> None:
        self.limit, self.max_new_tokens, self.batch_size = limit, max_new_tokens, batch_size
        self.results: dict[str, float] = {}

    def _evaluate(self, trainer: L.Trainer, module: Any) -> float:
        dm = trainer.datamodule
        samples = dm.val_samples[: self.limit] if self.limit else dm.val_samples
        messages, refs = split_for_generation(samples)
        style: PromptStyle = dm.style
        prompts = [style.generation_prompt(m, module.tokenizer) for m in messages]
        preds = generate(
            module.model, module.tokenizer, prompts, self.max_new_tokens, self.batch_size, progress=True
        )
        return exact_match(preds, refs)

    def on_fit_start(self, trainer: L.Trainer, module: Any) -> None:
        if not trainer.datamodule.val_samples:
            return
        with adapters_disabled(module.model), trainer.precision_plugin.forward_context():
            self.results["base"] = self._evaluate(trainer, module)
        trainer.print(
            f"exact match of the base model on {self._count(trainer)} validation samples: "
            f"{self.results['base']:.1%}"
        )

    def on_fit_end(self, trainer: L.Trainer, module: Any) -> None:
        if not trainer.datamodule.val_samples:
            return
        with trainer.precision_plugin.forward_context():
            self.results["tuned"] = self._evaluate(trainer, module)
        base = self.results.get("base")
        trainer.print(
            f"exact match on {self._count(trainer)} validation samples: "
            + (f"base {base:.1%} -> " if base is not None else "")
            + f"tuned {self.results['tuned']:.1%}"
        )

    def _count(self, trainer: L.Trainer) -> int:
        n = len(trainer.datamodule.val_samples)
        return min(n, self.limit) if self.limit else n
