"""Tokenizing samples with the prompt masked; padding them into batches, or packing several into one row."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from litpeft.data.prompts import Message, PromptStyle, bos_ids
from litpeft.loss import IGNORE_INDEX


def encode(
    messages: list[Message],
    style: PromptStyle,
    tokenizer: PreTrainedTokenizerBase,
    train_on_inputs: bool = False,
    prefix_ids: list[int] | None = None,
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (-100 on tokens that carry no loss) of one sample.

    The style's segments are tokenized one run at a time (adjacent segments with the same loss flag are
    joined first), so the mask follows the segment borders exactly. ``prefix_ids`` (default: what the
    tokenizer puts before text, usually BOS) starts the sample unless the style's text already does.
    """
    return encode_many([messages], style, tokenizer, train_on_inputs, prefix_ids)[0]


def encode_many(
    samples: Sequence[list[Message]],
    style: PromptStyle,
    tokenizer: PreTrainedTokenizerBase,
    train_on_inputs: bool = False,
    prefix_ids: list[int] | None = None,
) -> list[dict[str, list[int]]]:
    """:func:`encode` for many samples, with one (parallel) tokenizer call for all their runs."""
    all_runs: list[list[tuple[str, bool]]] = []
    for messages in samples:
        runs: list[tuple[str, bool]] = []
        for text, is_assistant in style.segments(messages, tokenizer):
            if runs and runs[-1][1] == is_assistant:
                runs[-1] = (runs[-1][0] + text, is_assistant)
            elif text:
                runs.append((text, is_assistant))
        all_runs.append(runs)
    texts = [text for runs in all_runs for text, _ in runs]
    all_ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    prefix = bos_ids(tokenizer) if prefix_ids is None else prefix_ids
    eos = None if style.appends_eos else tokenizer.eos_token_id
    out = []
    for runs in all_runs:
        start = [] if runs and tokenizer.bos_token and runs[0][0].startswith(tokenizer.bos_token) else prefix
        input_ids, labels = list(start), [IGNORE_INDEX] * len(start)
        for _, is_assistant in runs:
            ids = list(next(all_ids))
            if is_assistant and eos is not None:
                ids.append(eos)
            input_ids += ids
            labels += ids if (is_assistant or train_on_inputs) else [IGNORE_INDEX] * len(ids)
        out.append({"input_ids": input_ids, "labels": labels})
    return out


def pad_batch(
    samples: Sequence[dict[str, Any]], pad_id: int, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` with ``pad_id`` and ``labels`` with -100; attention mask marks real tokens."""
    length = max(len(s["input_ids"]) for s in samples)
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = {
        "input_ids": torch.full((len(samples), length), pad_id, dtype=torch.long),
        "labels": torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((len(samples), length), dtype=torch.long),
    }
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        batch["input_ids"][i, :n] = torch.as_tensor(s["input_ids"])
        batch["labels"][i, :n] = torch.as_tensor(s["labels"])
        batch["attention_mask"][i, :n] = 1
    return batch


def pack_batch(
    rows: Sequence[Sequence[dict[str, Any]]], pad_id: int, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Rows of several samples each, laid end to end, with position ids that restart at every sample.

    There is no ``attention_mask``: given ``position_ids`` and no mask, transformers finds the sample
    borders from the restarts and keeps attention inside each sample (a block-diagonal causal mask for
    eager/SDPA/flex attention, variable-length kernels for flash attention). The first token of every
    sample gets label -100, so the last token of one sample is never trained to predict the next sample.
    The padding at the end of a row continues the last sample's positions, with no loss: causal attention
    keeps every real token from seeing it, and a row holds only real samples (methods that insert tokens
    before every sample, such as prompt tuning, need find no sample made of padding).
    """
    length = max(sum(len(s["input_ids"]) for s in row) for row in rows)
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = {
        "input_ids": torch.full((len(rows), length), pad_id, dtype=torch.long),
        "labels": torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), length), dtype=torch.long),
    }
    for i, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s["input_ids"])
            batch["input_ids"][i, at : at + n] = torch.as_tensor(s["input_ids"])
            batch["labels"][i, at : at + n] = torch.as_tensor(s["labels"])
            batch["labels"][i, at] = IGNORE_INDEX
            batch["position_ids"][i, at : at + n] = torch.arange(n)
            at += n
        last = len(row[-1]["input_ids"]) if row else 0
        batch["position_ids"][i, at:] = torch.arange(last, last + length - at)
    return batch


def pack_indices(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group samples into rows of at most ``max_length`` tokens: best fit, longest sample first.

    Deterministic (ties keep index order); every row keeps its samples in index order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, r = free.pop(at)
            rows[r].append(i)
        else:
            room, r = max_length, len(rows)
            rows.append([i])
        bisect.insort(free, (room - n, r))
    return [sorted(row) for row in rows]


class TokenizedSamples(torch.utils.data.Dataset):
    """Tokenized samples stored flat (one ``input_ids`` and one ``labels`` tensor plus offsets).

    Flat int32 tensors are compact, quick to save and load, and cheap to send to DataLoader workers.
    """

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor) -> None:
        self.input_ids, self.labels, self.offsets = input_ids, labels, offsets

    @classmethod
    def from_samples(cls, samples: Sequence[dict[str, Sequence[int]]]) -> TokenizedSamples:
        lengths = torch.tensor([len(s["input_ids"]) for s in samples], dtype=torch.long)
        offsets = torch.zeros(len(samples) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lengths, 0)
        flat = lambda key: torch.tensor(  # noqa: E731
            [t for s in samples for t in s[key]], dtype=torch.int32
        )
        return cls(flat("input_ids"), flat("labels"), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"input_ids": self.input_ids[a:b].long(), "labels": self.labels[a:b].long()}

    @property
    def lengths(self) -> list[int]:
        return (self.offsets[1:] - self.offsets[:-1]).tolist()

    def _token_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For every flat token: the index of its sample and its position inside that sample."""
        lengths = self.offsets[1:] - self.offsets[:-1]
        sample = torch.repeat_interleave(torch.arange(len(self)), lengths)
        return sample, torch.arange(len(self.input_ids)) - self.offsets[sample]

    def has_loss(self, max_length: int | None = None) -> torch.Tensor:
        """Per sample: whether any of its first ``max_length`` tokens carries loss."""
        sample, position = self._token_positions()
        keep = self.labels != IGNORE_INDEX
        if max_length is not None:
            keep &= position < max_length
        return torch.bincount(sample[keep], minlength=len(self)) > 0

    def select(self, indices: Sequence[int], max_length: int | None = None) -> TokenizedSamples:
        """The samples at ``indices`` (ascending), each cut to ``max_length`` tokens."""
        chosen = torch.zeros(len(self), dtype=torch.bool)
        chosen[torch.as_tensor(list(indices), dtype=torch.long)] = True
        sample, position = self._token_positions()
        keep = chosen[sample]
        if max_length is not None:
            keep &= position < max_length
        lengths = torch.bincount(sample[keep], minlength=len(self))[chosen]
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lengths, 0)
        return TokenizedSamples(self.input_ids[keep], self.labels[keep], offsets)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "labels": self.labels, "offsets": self.offsets}


class PackedSamples(torch.utils.data.Dataset):
    """Rows of packed samples: item ``i`` is the list of samples of row ``i`` (see :func:`pack_batch`)."""

    def __init__(self, samples: TokenizedSamples, rows: list[list[int]]) -> None:
        self.samples, self.rows = samples, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[dict[str, torch.Tensor]]:
        return [self.samples[j] for j in self.rows[i]]


def collate_packed(rows: Sequence[list[dict[str, Any]]], pad_id: int) -> dict[str, torch.Tensor]:
    return pack_batch(rows, pad_id)
