"""``InstructionDataModule``: instruction data, tokenized with the prompt masked, in resumable batches."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from litpeft.data.collate import IGNORE_INDEX, encode, pad_batch
from litpeft.data.prompts import Message, PromptStyle, get_style
from litpeft.data.sources import DEMO_DIR, load_alpaca
from litpeft.errors import LitPeftError

log = logging.getLogger(__name__)


class ResumableSampler(DistributedSampler):
    """Shuffles with ``seed + epoch`` and shards across ranks; a resumed run continues mid-epoch.

    ``batches_done()`` returns how many training batches the run has consumed in total (restored from
    the checkpoint on resume); the data epoch and the batches to skip follow from it, so the order does
    not depend on Lightning's epoch counter (which is one ahead after a run stopped by ``max_steps``).
    Subclassing ``DistributedSampler`` keeps Lightning from wrapping it in a sampler of its own.
    """

    def __init__(
        self,
        dataset: Any,
        num_replicas: int,
        rank: int,
        shuffle: bool,
        seed: int,
        batch_size: int,
        batches_done: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self.batch_size = batch_size
        self.batches_done = batches_done

    def __iter__(self) -> Iterator[int]:
        skip = 0
        if self.batches_done is not None:
            per_epoch = math.ceil(self.num_samples / self.batch_size)
            self.epoch, skip = divmod(self.batches_done(), per_epoch)
        indices = list(super().__iter__())
        return iter(indices[skip * self.batch_size :])


class InstructionDataModule(L.LightningDataModule):
    """Instruction data for causal-LM fine-tuning.

    Args:
        train_file: Alpaca-style ``.json``/``.jsonl`` (``instruction``, optional ``input``, ``output``).
            Default: the bundled demo set.
        val_file: a separate validation file. Without one, ``val_fraction`` of the training rows
            (chosen with ``seed``) are held out.
        val_fraction: share of training rows held out when there is no ``val_file``.
        prompt_style: ``auto`` (the tokenizer's chat template if it has one, else ``alpaca``), a style name,
            or a :class:`~litpeft.data.prompts.PromptStyle` instance.
        max_seq_length: longest sample in tokens.
        truncation: what to do with a longer sample: ``truncate`` it, ``drop`` it, or raise an ``error``.
        train_on_inputs: also compute the loss on prompt tokens.
        batch_size: samples per training batch (per device).
        eval_batch_size: samples per validation batch (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        seed: seed of the validation split and of the shuffling.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        val_fraction: float = 0.1,
        prompt_style: str | PromptStyle = "auto",
        max_seq_length: int = 1024,
        truncation: Literal["truncate", "drop", "error"] = "truncate",
        train_on_inputs: bool = False,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
    ) -> None:
        super().__init__()
        if train_file is None:
            train_file = str(DEMO_DIR / "train.jsonl")
            val_file = val_file or str(DEMO_DIR / "val.jsonl")
        self.train_file, self.val_file, self.val_fraction = train_file, val_file, val_fraction
        self.prompt_style = prompt_style
        self.max_seq_length, self.truncation, self.train_on_inputs = (
            max_seq_length,
            truncation,
            train_on_inputs,
        )
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.style: PromptStyle | None = None
        self.train_samples: list[list[Message]] = []
        self.val_samples: list[list[Message]] = []
        self.train_data: list[dict[str, list[int]]] = []
        self.val_data: list[dict[str, list[int]]] = []
        # Read (and validate) the rows now: bad data fails before a run directory is created.
        self.load_samples()

    # -- loading ----------------------------------------------------------------------------------
    def load_samples(self) -> None:
        """Read the raw samples (no tokenizer needed). Subclasses override this for other sources."""
        train = load_alpaca(self.train_file)
        if self.val_file:
            self.train_samples, self.val_samples = train, load_alpaca(self.val_file)
        else:
            order = list(range(len(train)))
            random.Random(self.seed).shuffle(order)
            n_val = int(round(len(train) * self.val_fraction))
            self.val_samples = [train[i] for i in order[:n_val]]
            self.train_samples = [train[i] for i in sorted(order[n_val:])]
        if not self.train_samples:
            raise LitPeftError(f"no training samples in '{self.train_file}'")

    def _resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            self.tokenizer = getattr(module, "tokenizer", None)
        if self.tokenizer is None:
            raise LitPeftError(
                "InstructionDataModule needs a tokenizer: set .tokenizer or use it with a PeftLM"
            )
        return self.tokenizer

    def tokenize(self, samples: list[list[Message]], split: str) -> list[dict[str, list[int]]]:
        out, truncated = [], 0
        for i, messages in enumerate(samples):
            sample = encode(messages, self.style, self.tokenizer, self.train_on_inputs)
            if len(sample["input_ids"]) > self.max_seq_length:
                if self.truncation == "error":
                    raise LitPeftError(
                        f"{split} sample {i} has {len(sample['input_ids'])} tokens, more than "
                        f"max_seq_length={self.max_seq_length} (truncation: error)"
                    )
                truncated += 1
                if self.truncation == "drop":
                    continue
                sample = {k: v[: self.max_seq_length] for k, v in sample.items()}
            if any(t != IGNORE_INDEX for t in sample["labels"]):
                out.append(sample)
        if truncated:
            log.info(
                "%s: %d of %d samples longer than max_seq_length=%d were %s",
                split,
                truncated,
                len(samples),
                self.max_seq_length,
                "dropped" if self.truncation == "drop" else "truncated",
            )
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.train_data or self.val_data:
            return
        tokenizer = self._resolve_tokenizer()
        self.style = get_style(self.prompt_style, tokenizer)
        self.train_data = self.tokenize(self.train_samples, "train")
        self.val_data = self.tokenize(self.val_samples, "val")
        if not self.train_data:
            raise LitPeftError(f"no training sample of '{self.train_file}' is left after tokenization")

    # -- loaders ----------------------------------------------------------------------------------
    def _collate(self) -> Any:
        return partial(pad_batch, pad_id=self.tokenizer.pad_token_id)

    def _batches_done(self) -> int:
        """Training batches consumed so far by this run (restored from the checkpoint on resume)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.ready if self.trainer else 0

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
        return DataLoader(
            self.train_data,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self._collate(),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_data,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self._collate(),
            num_workers=self.num_workers,
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
