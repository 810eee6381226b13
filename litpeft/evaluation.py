"""Evaluation metrics: answer-token loss/perplexity/accuracy (as in training), exact match and ROUGE-L
of generated answers, and the :class:`ExactMatchEvaluation` callback for ``litpeft fit``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import lightning as L
import torch
from torchmetrics.text.rouge import ROUGEScore  # ROUGE-L needs neither nltk nor rouge-score installed
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from litpeft.data.collate import encode, pad_batch
from litpeft.data.prompts import Message, PromptStyle, style_name
from litpeft.errors import LitPeftError
from litpeft.inference import LoadedModel, generate, split_for_generation
from litpeft.loss import IGNORE_INDEX, answer_logits, token_loss
from litpeft.methods import adapters_disabled


# -- loss on the answer tokens ----------------------------------------------------------------------
@torch.no_grad()
def token_metrics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    style: PromptStyle,
    conversations: Sequence[list[Message]],
    max_seq_length: int = 1024,
    batch_size: int = 8,
) -> dict[str, float]:
    """Next-token loss, perplexity and accuracy over the answer tokens, and their count.

    The samples are encoded, masked and scored exactly as in training (:func:`litpeft.loss.answer_logits`
    and :func:`litpeft.loss.token_loss`, the path of ``PeftLM.loss_and_accuracy``); samples with no
    answer token within ``max_seq_length`` are skipped. The loss is the mean over all answer tokens.
    """
    samples = []
    for messages in conversations:
        s = encode(messages, style, tokenizer)
        s = {k: v[:max_seq_length] for k, v in s.items()}
        if any(t != IGNORE_INDEX for t in s["labels"][1:]):
            samples.append(s)
    if not samples:
        raise LitPeftError("no sample has answer tokens within max_seq_length")
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(0, len(samples), batch_size):
        batch = pad_batch(samples[i : i + batch_size], tokenizer.pad_token_id)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits, targets = answer_logits(model, batch)
        loss, hits = token_loss(logits, targets, reduction="sum")
        loss_sum += loss.item()
        correct += int(hits)
        count += int(targets.numel())
    loss = loss_sum / count
    return {"loss": loss, "perplexity": math.exp(loss), "token_accuracy": correct / count, "tokens": count}


# -- generated answers against references -----------------------------------------------------------
def normalize(text: str) -> str:
    """``text`` with surrounding whitespace removed and inner runs of whitespace as one space."""
    return " ".join(text.strip().split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after whitespace normalization (nan if none)."""
    if not references:
        return float("nan")
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True)) / len(
        references
    )


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (Lin 2004): longest common subsequence of the lowercased alphanumeric words.

    torchmetrics' ``ROUGEScore`` with the ``rouge-score`` package's default tokenizer; ROUGE-L needs no
    NLTK data (only ``rougeLsum`` and the stemmer do).
    """
    if not references:
        return float("nan")
    scores = ROUGEScore(rouge_keys="rougeL")(list(predictions), list(references))
    return float(scores["rougeL_fmeasure"])


def generation_metrics(
    loaded: LoadedModel,
    conversations: Sequence[list[Message]],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[dict[str, float], list[str], list[str]]:
    """Greedy answers to each conversation's prompt (all but its last assistant turn) scored against that
    turn: ``({"exact_match", "rougeL"}, predictions, references)``."""
    messages, refs = split_for_generation(conversations)
    references = cast("list[str]", refs)  # need_reference (the default): every one is a string
    prompts = [loaded.prompt(m) for m in messages]
    preds = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens, batch_size, progress=progress)
    metrics = {"exact_match": exact_match(preds, references), "rougeL": rouge_l(preds, references)}
    return metrics, preds, references


def evaluate_conversations(
    loaded: LoadedModel,
    conversations: Sequence[list[Message]],
    max_seq_length: int = 1024,
    batch_size: int = 8,
    generation: bool = True,
    max_new_tokens: int = 128,
) -> tuple[dict[str, Any], list[str], list[str]]:
    """``litpeft evaluate --data``: what was evaluated, :func:`token_metrics` and (``generation``)
    :func:`generation_metrics`, as ``(summary, predictions, references)``."""
    summary: dict[str, Any] = {
        "samples": len(conversations),
        "adapter": loaded.adapter,
        "base_model": loaded.base,
        "method": loaded.method.config() if loaded.method is not None else None,
        "prompt_style": style_name(loaded.style),
    }
    tokenizer = loaded.tokenizer
    summary.update(
        token_metrics(loaded.model, tokenizer, loaded.style, conversations, max_seq_length, batch_size)
    )
    if not generation:
        return summary, [], []
    metrics, preds, refs = generation_metrics(
        loaded, conversations, max_new_tokens, batch_size, progress=True
    )
    summary.update(metrics, max_new_tokens=max_new_tokens)
    return summary, preds, refs


# -- during training --------------------------------------------------------------------------------
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
        # batches in the validation order, as the callback's figures (the demo's) have always been taken
        preds = generate(
            module.model,
            module.tokenizer,
            prompts,
            self.max_new_tokens,
            self.batch_size,
            progress=True,
            longest_first=False,
        )
        return exact_match(preds, cast("list[str]", refs))

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


__all__ = [
    "ExactMatchEvaluation",
    "exact_match",
    "generation_metrics",
    "normalize",
    "rouge_l",
    "token_metrics",
]
