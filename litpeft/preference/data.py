"""Preference data: rows of prompt, chosen and rejected answer, read and tokenized on litpeft's data layer.

Rows come through the same sources and readers as instruction data (local files, directories, saved
datasets, ``hub://org/name``; bad rows reported with ``file:line``); :class:`PreferenceSource` reads the
shapes in use:

- strings: ``{"prompt": "...", "chosen": "...", "rejected": "..."}``;
- message lists (UltraFeedback-binarized): ``chosen``/``rejected`` hold the whole conversation, the shared
  turns before the last one are the prompt (``prompt`` may hold the same text and is then not needed);
- conversational TRL style: ``prompt`` a message list, ``chosen``/``rejected`` one assistant message each;
- HH-RLHF: ``chosen``/``rejected`` strings of ``\\n\\nHuman: ...\\n\\nAssistant: ...`` turns, no prompt.

Each side is rendered with the model's prompt style exactly as an SFT sample (:func:`litpeft.data.collate.
encode`); only the last assistant turn carries labels. A batch of ``B`` pairs is ``2B`` rows, the chosen
then the rejected (TRL's layout), right-padded (:func:`collate_pairs`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from litpeft.data.collate import encode_many, pad_batch
from litpeft.data.datamodule import DEMO, InstructionDataModule, ResumableSampler
from litpeft.data.prompts import Message, PromptStyle, bos_ids, style_name
from litpeft.data.sources import DEMO_DIR, BadRow, Chat, DataSource, text_field
from litpeft.errors import LitPeftError
from litpeft.loss import IGNORE_INDEX

log = logging.getLogger(__name__)

#: the bundled demo pairs (``scripts/make_preference_data.py``): a date in ISO form preferred over another form
DEMO_TRAIN, DEMO_VAL = DEMO_DIR / "preference_train.jsonl", DEMO_DIR / "preference_val.jsonl"
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


@dataclass
class PreferencePair:
    """One row: the prompt turns, and the chosen and rejected assistant answers."""

    prompt: list[Message]
    chosen: Message
    rejected: Message


def hh_turns(text: str) -> list[Message] | None:
    """An HH-RLHF transcript (``\\n\\nHuman: ...\\n\\nAssistant: ...``) as messages; None if it is not one."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": said} for who, said in zip(parts[1::2], parts[2::2], strict=True)]


class PreferenceSource(DataSource):
    """Preference rows (see the module docstring for the shapes). Storage options as :class:`DataSource`.

    Args:
        prompt: the row's field with the prompt (a string or a message list).
        chosen: the field with the preferred answer (a string, or messages ending with it).
        rejected: the field with the other answer.
    """

    def __init__(
        self, prompt: str = "prompt", chosen: str = "chosen", rejected: str = "rejected", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.prompt, self.chosen, self.rejected = prompt, chosen, rejected

    def turns(self, row: dict[str, Any], key: str, where: str, answer: bool) -> list[Message]:
        """``row[key]`` as messages: a string is one turn (an HH-RLHF transcript, several)."""
        value = row.get(key)
        if isinstance(value, str):
            turns = hh_turns(value)
            if turns is not None:
                return turns
            text = text_field(row, key, where)
            return [{"role": "assistant" if answer else "user", "content": text}]
        return Chat(column=key).to_messages(row, where, need_answer=False)

    def to_messages(self, row: Any, where: str) -> PreferencePair:  # type: ignore[override]
        if not isinstance(row, dict):
            raise BadRow(where, f"expected a JSON object, got {type(row).__name__}")
        chosen = self.turns(row, self.chosen, where, answer=True)
        rejected = self.turns(row, self.rejected, where, answer=True)
        for key, turns in ((self.chosen, chosen), (self.rejected, rejected)):
            if turns[-1]["role"] != "assistant":
                raise BadRow(where, "must end with the assistant's answer", key)
        context = chosen[:-1]
        if context != rejected[:-1]:
            raise BadRow(where, f"differs from '{self.chosen}' before its last turn", self.rejected)
        if context:  # the conversation is in chosen/rejected (UltraFeedback, HH-RLHF)
            prompt = context
        elif row.get(self.prompt) is None:
            raise BadRow(where, "is missing (chosen/rejected hold only the answer)", self.prompt)
        else:
            prompt = self.turns(row, self.prompt, where, answer=False)
        if all(m["role"] == "assistant" for m in prompt):
            raise BadRow(where, "has no user turn", self.prompt)
        return PreferencePair(prompt, chosen[-1], rejected[-1])


def encode_pairs(
    pairs: list[PreferencePair], style: PromptStyle, tokenizer: Any
) -> list[tuple[dict[str, list[int]], dict[str, list[int]]]]:
    """Each pair's chosen and rejected sample, rendered as SFT samples; labels only on the last answer."""
    samples = [[*p.prompt, answer] for p in pairs for answer in (p.chosen, p.rejected)]
    encoded = encode_many(samples, style, tokenizer, False, bos_ids(tokenizer))
    for e in encoded:
        labels = e["labels"]
        end = max(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
        start = end
        while start > 0 and labels[start - 1] != IGNORE_INDEX:
            start -= 1
        e["labels"] = [IGNORE_INDEX] * start + labels[start:]  # earlier assistant turns are prompt
        e["prompt_length"] = start  # type: ignore[assignment]
    return list(zip(encoded[0::2], encoded[1::2], strict=True))


class PairSamples(Dataset):
    """Tokenized pairs: item ``i`` is ``(chosen, rejected)``, each ``{input_ids, labels}`` tensors and the
    pair's index ``pair_index`` (the key of its cached reference log-probabilities)."""

    def __init__(self, pairs: list[tuple[dict[str, list[int]], dict[str, list[int]]]]) -> None:
        self.pairs = [
            tuple({k: torch.tensor(s[k], dtype=torch.int32) for k in ("input_ids", "labels")} for s in pair)
            for pair in pairs
        ]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[dict[str, Any], dict[str, Any]]:
        return tuple({**{k: v.long() for k, v in s.items()}, "pair_index": i} for s in self.pairs[i])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """A hash of every pair's tokens and labels, in order: a cache keyed by ``pair_index`` belongs to it."""
        digest = hashlib.sha256()
        for pair in self.pairs:
            for s in pair:
                for k in ("input_ids", "labels"):
                    digest.update(s[k].numpy().tobytes())
                digest.update(b"|")
        return digest.hexdigest()[:16]


def collate_pairs(pairs: list[tuple[dict[str, Any], dict[str, Any]]], pad_id: int) -> dict[str, torch.Tensor]:
    """``B`` pairs -> ``2B`` right-padded rows, the chosen answers first, then the rejected ones; with
    ``pair_index`` ``(B,)`` when the pairs carry it (:class:`PairSamples`)."""
    batch = pad_batch([p[0] for p in pairs] + [p[1] for p in pairs], pad_id)
    if "pair_index" in pairs[0][0]:
        batch["pair_index"] = torch.tensor([p[0]["pair_index"] for p in pairs], dtype=torch.long)
    return batch


class PreferenceDataModule(InstructionDataModule):
    """Preference pairs for :class:`~litpeft.preference.PreferenceLM`.

    Args:
        train_file: the pairs: a file, a directory, a saved dataset or ``hub://org/name`` (as for
            :class:`~litpeft.data.InstructionDataModule`). Default: the bundled demo pairs.
        val_file, val_fraction, prompt_style, num_workers, seed, skip_bad_rows, pin_memory: as there.
        max_seq_length: the longest chosen or rejected sample in tokens. A longer one keeps its prompt
            whole and has its answer cut (``truncation: truncate``); a pair whose prompt alone reaches it
            is dropped. One summary line reports both.
        truncation: ``truncate`` the answers, ``drop`` the pair, or raise an ``error`` naming the row.
        batch_size: pairs per training batch, per device (each pair is two rows).
        eval_batch_size: pairs per validation batch (default: ``batch_size``).
        source: how rows become pairs: :class:`PreferenceSource` (field names, storage options).
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        val_fraction: float = 0.1,
        prompt_style: str | PromptStyle = "auto",
        max_seq_length: int = 1024,
        truncation: Literal["truncate", "drop", "error"] = "truncate",
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        source: DataSource | None = None,
        skip_bad_rows: bool = False,
        pin_memory: bool | None = None,
    ) -> None:
        if train_file == DEMO:  # only an explicit opt-in trains on the bundled pairs (as for SFT data)
            train_file, val_file = str(DEMO_TRAIN), val_file or str(DEMO_VAL)
        super().__init__(
            train_file=train_file,
            val_file=val_file,
            val_fraction=val_fraction,
            prompt_style=prompt_style,
            max_seq_length=max_seq_length,
            truncation=truncation,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
            source=source if source is not None else PreferenceSource(),
            skip_bad_rows=skip_bad_rows,
            cache=False,
            pin_memory=pin_memory,
        )

    def tokenize(self, samples: list[PreferencePair], split: str) -> list[Any]:  # type: ignore[override]
        self.stats[split]["tokenized"] = len(samples)
        return encode_pairs(samples, self.style, self.tokenizer) if samples else []

    def apply_max_length(self, data: list[Any], split: str) -> PairSamples:  # type: ignore[override]
        """Answers past ``max_seq_length`` cut (prompt kept whole); pairs with no answer token left dropped."""
        limit, keep, cut, dropped = self.max_seq_length, [], 0, 0
        where = self.locations.get(split, [])
        for i, (chosen, rejected) in enumerate(data):
            long = max(len(chosen["input_ids"]), len(rejected["input_ids"])) > limit
            if long and self.truncation == "error":
                raise LitPeftError(
                    f"{where[i] if i < len(where) else f'{split} pair {i}'}: longer than "
                    f"data.max_seq_length={limit} tokens (data.truncation: error; use truncate or drop)"
                )
            if long and (
                self.truncation == "drop" or max(s["prompt_length"] for s in (chosen, rejected)) >= limit
            ):
                dropped += 1
                continue
            cut += long
            keep.append(tuple({k: s[k][:limit] for k in ("input_ids", "labels")} for s in (chosen, rejected)))
        self.stats[split].update(truncated=cut, dropped=dropped)
        return PairSamples(keep)

    def _summary(self, raw_train: list[Any]) -> str:
        t, v = self.stats["train"], self.stats["val"]
        skipped = t["skipped"] + v["skipped"]
        lengths = sorted(max(len(c["input_ids"]), len(r["input_ids"])) for c, r in raw_train)
        return (
            f"preference data: {len(self.train_data)} train / {len(self.val_data)} val pairs; "
            f"{t['truncated'] + v['truncated']} with answers cut to max_seq_length={self.max_seq_length} "
            f"(prompt kept), {t['dropped'] + v['dropped']} dropped (truncation={self.truncation})"
            + (f", {skipped} bad rows skipped" if skipped else "")
            + f"; longest sample {lengths[-1] if lengths else 0} tokens; style {style_name(self.style)}"
        )

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Any = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            collate_fn=partial(collate_pairs, pad_id=self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = ResumableSampler(
            self.train_data,
            world,
            rank,
            shuffle=True,
            seed=self.seed,
            batch_size=self.batch_size,
            batches_done=self._batches_done,
        )
        return self._loader(self.train_data, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_data, self.eval_batch_size)
