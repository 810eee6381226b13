"""Tokenizing samples with the prompt masked, and padding them into batches."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from litpeft.data.prompts import Message, PromptStyle

IGNORE_INDEX = -100


def encode(
    messages: list[Message],
    style: PromptStyle,
    tokenizer: PreTrainedTokenizerBase,
    train_on_inputs: bool = False,
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (-100 on tokens that carry no loss) of one sample."""
    input_ids: list[int] = []
    labels: list[int] = []
    if (
        tokenizer.bos_token_id is not None
        and getattr(tokenizer, "add_bos_token", False)
        and not style.appends_eos
    ):
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, is_assistant in style.segments(messages, tokenizer):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if is_assistant and not style.appends_eos and tokenizer.eos_token_id is not None:
            ids = [*ids, tokenizer.eos_token_id]
        input_ids += ids
        labels += ids if (is_assistant or train_on_inputs) else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


def pad_batch(
    samples: list[dict[str, list[int]]], pad_id: int, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` with ``pad_id`` and ``labels`` with -100; attention mask marks real tokens."""
    length = max(len(s["input_ids"]) for s in samples)
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch: dict[str, Any] = {
        "input_ids": torch.full((len(samples), length), pad_id, dtype=torch.long),
        "labels": torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((len(samples), length), dtype=torch.long),
    }
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(s["input_ids"])
        batch["labels"][i, :n] = torch.tensor(s["labels"])
        batch["attention_mask"][i, :n] = 1
    return batch
