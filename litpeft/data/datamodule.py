"""``InstructionDataModule``: instruction data, tokenized once with the prompt masked, in resumable batches."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from litpeft.data import cache
from litpeft.data.collate import (
    PackedSamples,
    TokenizedSamples,
    collate_packed,
    encode_many,
    pack_indices,
    pad_batch,
)
from litpeft.data.prompts import Message, PromptStyle, bos_ids, get_style, style_name
from litpeft.data.sources import DEMO_DIR, AutoSource, DataSource
from litpeft.errors import LitPeftError

log = logging.getLogger(__name__)

#: ``train_file: demo``: the bundled date-normalization set (litpeft/data/demo/*.jsonl, ``make demo``'s).
DEMO = "demo"


class ResumableSampler(DistributedSampler):
    """Shuffles with ``seed + epoch`` and shards across ranks; a resumed run continues mid-epoch.

    ``batches_done()`` returns how many training batches the run has consumed in total (restored from
    the checkpoint on resume); the data epoch and the batches to skip follow from it, so the order does
    not depend on Lightning's epoch counter (which is one ahead after a run stopped by ``max_steps``).
    Subclassing ``DistributedSampler`` keeps Lightning from wrapping it in a sampler of its own. With
    ``lengths`` the order is length-grouped: the shuffled samples are cut into chunks of ``group_size``
    global batches, each chunk is sorted by length and cut into global batches (``batch_size *
    num_replicas`` samples of similar length), and the batches are shuffled, so a batch pads little and
    the epoch is still random.
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
        lengths: Sequence[int] | None = None,
        group_size: int = 64,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self.batch_size = batch_size
        self.batches_done = batches_done
        self.lengths, self.group_size = lengths, group_size

    def _grouped(self) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=g).tolist()
        order += order[: self.total_size - len(order)]  # pad to a multiple of num_replicas, as the parent
        step = self.batch_size * self.num_replicas
        batches: list[list[int]] = []
        for start in range(0, len(order), step * self.group_size):
            chunk = sorted(order[start : start + step * self.group_size], key=lambda i: -self.lengths[i])
            batches += [chunk[b : b + step] for b in range(0, len(chunk), step)]
        full, last = (batches[:-1], batches[-1:]) if len(batches[-1]) < step else (batches, [])
        full = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
        mine: list[int] = []
        for batch in full + last:  # each rank takes its share of every global batch
            share = len(batch) // self.num_replicas
            mine += batch[self.rank * share : (self.rank + 1) * share]
        return mine

    def __iter__(self) -> Iterator[int]:
        skip = 0
        if self.batches_done is not None:
            per_epoch = math.ceil(self.num_samples / self.batch_size)
            self.epoch, skip = divmod(self.batches_done(), per_epoch)
        indices = self._grouped() if self.lengths is not None and self.shuffle else list(super().__iter__())
        return iter(indices[skip * self.batch_size :])


class InstructionDataModule(L.LightningDataModule):
    """Instruction data for causal-LM fine-tuning.

    Args:
        train_file: a data file (``.json``, ``.jsonl``, ``.parquet``, ``.csv``, ``.tsv``, ``.arrow``), a
            directory of such files, a ``datasets`` ``save_to_disk`` directory, or a hub dataset
            ``hub://org/name[@revision][/path/in/repo]`` (downloaded on first use), or ``demo``: the bundled
            date-normalization task (``configs/demo.yaml``; its own held-out split unless ``val_file``).
            Required: no file is a one-line error, not a silent demo run.
        val_file: a separate validation file (same kinds). Without one, ``val_fraction`` of the training
            rows (chosen with ``seed``) are held out.
        val_fraction: share of training rows held out when there is no ``val_file``.
        prompt_style: ``auto`` (the tokenizer's chat template if it has one, else ``alpaca``), a style name
            (``alpaca``, ``chatml``, ``llama-3``, ``plain``, ``chat_template``), the import path of a
            :class:`~litpeft.data.prompts.PromptStyle` subclass, or an instance.
        max_seq_length: longest sample (and, with ``packing``, longest row) in tokens.
        truncation: what to do with a longer sample: ``truncate`` it, ``drop`` it, or raise an ``error``.
        train_on_inputs: also compute the loss on prompt tokens.
        batch_size: samples (rows, with ``packing``) per training batch, per device.
        eval_batch_size: samples per validation batch (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        seed: seed of the validation split, of packing and of the shuffling.
        source: how rows become chat messages: :class:`~litpeft.data.sources.AutoSource` (default: Alpaca,
            OpenAI ``messages`` or ShareGPT ``conversations``, told apart per row), ``Alpaca`` (with a
            ``column_map``), ``Chat``, ``ShareGPT``, ``HFDataset``, or a subclass of ``DataSource``.
        skip_bad_rows: skip rows that cannot be read (and report how many) instead of stopping.
        packing: put several samples into each row of ``max_seq_length`` tokens; attention stays inside
            each sample (per-sample position ids).
        group_by_length: without packing, batch samples of similar length together (less padding).
        cache: keep the tokenized samples on disk (under ``<litpeft cache>/data``) and reuse them.
        pin_memory: pin batches in page-locked memory (default: when CUDA is available).
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
        source: DataSource | None = None,
        skip_bad_rows: bool = False,
        packing: bool = False,
        group_by_length: bool = False,
        cache: bool = True,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if truncation not in ("truncate", "drop", "error"):
            raise LitPeftError(f"data.truncation must be truncate, drop or error, got '{truncation}'")
        if not 0 <= val_fraction < 1:
            raise LitPeftError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        for name, value in (("max_seq_length", max_seq_length), ("batch_size", batch_size)):
            if value < 1:
                raise LitPeftError(f"data.{name} must be at least 1, got {value}")
        if packing and group_by_length:
            raise LitPeftError("data.packing and data.group_by_length exclude each other; choose one")
        if train_file is None:
            raise LitPeftError(
                "data.train_file is not set: give your data (--data.train_file my_data.jsonl), "
                f"or '{DEMO}' for the bundled demo task"
            )
        if train_file == DEMO:
            train_file = str(DEMO_DIR / "train.jsonl")
            val_file = val_file or str(DEMO_DIR / "val.jsonl")
        self.train_file, self.val_file, self.val_fraction = train_file, val_file, val_fraction
        self.prompt_style = prompt_style
        self.max_seq_length, self.truncation = max_seq_length, truncation
        self.train_on_inputs = train_on_inputs
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.source = source if source is not None else AutoSource()
        self.skip_bad_rows, self.packing, self.group_by_length = skip_bad_rows, packing, group_by_length
        self.cache = cache
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory

        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.style: PromptStyle | None = None
        self.train_samples: list[list[Message]] = []
        self.val_samples: list[list[Message]] = []
        self.train_data: TokenizedSamples | None = None
        self.val_data: TokenizedSamples | None = None
        #: per split: bad rows skipped, samples tokenized now (0 on a cache hit), truncated, dropped
        self.stats: dict[str, dict[str, int]] = {}
        #: per split: where each sample comes from (``file:line``), for errors
        self.locations: dict[str, list[str]] = {}
        # Read (and validate) the rows now: bad data fails before a run directory is created.
        self.load_samples()

    # -- loading ----------------------------------------------------------------------------------
    def load_samples(self) -> None:
        """Read the raw samples (no tokenizer needed). Subclasses override this for other sources."""
        train = self.source.load(self.train_file, "train", self.skip_bad_rows)
        self.stats["train"] = {"rows": train.rows, "skipped": len(train.skipped)}
        if self.val_file:
            val = self.source.load(self.val_file, "val", self.skip_bad_rows)
            self.stats["val"] = {"rows": val.rows, "skipped": len(val.skipped)}
            self.train_samples, self.val_samples = train.samples, val.samples
            self.locations = {"train": train.locations, "val": val.locations}
        else:
            order = list(range(len(train.samples)))
            random.Random(self.seed).shuffle(order)
            n_val = int(round(len(order) * self.val_fraction))
            if n_val == len(order):
                raise LitPeftError(
                    f"data.val_fraction={self.val_fraction} leaves no training sample of {len(order)}"
                )
            val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
            self.val_samples = [train.samples[i] for i in val_idx]
            self.train_samples = [train.samples[i] for i in train_idx]
            self.locations = {
                "train": [train.locations[i] for i in train_idx],
                "val": [train.locations[i] for i in val_idx],
            }
            self.stats["val"] = {"rows": 0, "skipped": 0}

    def _resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            self.tokenizer = getattr(module, "tokenizer", None)
        if self.tokenizer is None:
            raise LitPeftError(
                "InstructionDataModule needs a tokenizer: set .tokenizer or use it with a PeftLM"
            )
        return self.tokenizer

    def tokenize(self, samples: list[list[Message]], split: str) -> TokenizedSamples:
        """All samples of a split, untruncated: from the cache, or tokenized now (with a progress bar)."""
        key = cache.cache_key(samples, self.tokenizer, self.style, self.train_on_inputs) if self.cache else ""
        data = cache.load(key) if self.cache else None
        if data is not None and len(data) == len(samples):
            self.stats[split]["tokenized"] = 0
            return data
        prefix, chunk = bos_ids(self.tokenizer), 256
        encoded: list[dict[str, list[int]]] = []
        with tqdm(
            total=len(samples), desc=f"tokenizing {split}", unit=" samples", disable=not samples
        ) as bar:
            for start in range(0, len(samples), chunk):
                part = samples[start : start + chunk]
                encoded += encode_many(part, self.style, self.tokenizer, self.train_on_inputs, prefix)
                bar.update(len(part))
        data = TokenizedSamples.from_samples(encoded)
        self.stats[split]["tokenized"] = len(samples)
        if self.cache:
            cache.save(key, data)
        return data

    def apply_max_length(self, data: TokenizedSamples, split: str) -> TokenizedSamples:
        """``truncation`` for samples longer than ``max_seq_length``; a sample left without loss is dropped."""
        keep: list[int] = []
        truncated = dropped = 0
        has_loss = data.has_loss(self.max_seq_length).tolist()
        for i, n in enumerate(data.lengths):
            long = n > self.max_seq_length
            if long and self.truncation == "error":
                where = self.locations.get(split, [])
                raise LitPeftError(
                    f"{where[i] if i < len(where) else f'{split} sample {i}'}: {n} tokens, more than "
                    f"data.max_seq_length={self.max_seq_length} (data.truncation: error; use truncate or drop)"
                )
            # A truncated sample whose answer lies wholly past the cut has nothing to learn: dropped.
            if (long and self.truncation == "drop") or not has_loss[i]:
                dropped += 1
                continue
            truncated += long
            keep.append(i)
        self.stats[split].update(truncated=truncated, dropped=dropped)
        return data.select(keep, self.max_seq_length)

    def _prepare(self) -> None:
        if self.train_data is not None:
            return
        tokenizer = self._resolve_tokenizer()
        self.style = get_style(self.prompt_style, tokenizer)
        if not self.train_samples:  # read in __init__ already, unless a subclass cleared them
            self.load_samples()
        if not self.train_samples:
            raise LitPeftError(f"no training samples in '{self.train_file}'")
        raw = {"train": self.tokenize(self.train_samples, "train")}
        raw["val"] = self.tokenize(self.val_samples, "val")
        self.train_data = self.apply_max_length(raw["train"], "train")
        self.val_data = self.apply_max_length(raw["val"], "val")
        log.info(self._summary(raw["train"]))
        if not len(self.train_data):
            raise LitPeftError(
                f"no training sample of '{self.train_file}' is left after filtering "
                f"({self.stats['train']['dropped']} dropped by max_seq_length={self.max_seq_length})"
            )

    def _summary(self, raw_train: TokenizedSamples) -> str:
        """One line: sample counts, what truncation did, token-length percentiles, cache use."""
        t, v = self.stats["train"], self.stats["val"]
        lengths = sorted(raw_train.lengths)
        pct = lambda q: lengths[max(0, math.ceil(q * len(lengths)) - 1)]  # noqa: E731  (nearest rank)
        skipped = t["skipped"] + v["skipped"]
        return (
            f"data: {len(self.train_data)} train / {len(self.val_data)} val samples; "
            f"{t['truncated'] + v['truncated']} truncated, {t['dropped'] + v['dropped']} dropped "
            f"(max_seq_length={self.max_seq_length}, truncation={self.truncation})"
            + (f", {skipped} bad rows skipped" if skipped else "")
            + f"; train tokens p50={pct(0.5)} p90={pct(0.9)} p99={pct(0.99)} max={lengths[-1]}; "
            + ("tokenized" if t["tokenized"] or v["tokenized"] else "from cache")
            + f", style {style_name(self.style)}"
        )

    def prepare_data(self) -> None:
        # Runs on one process per node before ``setup``: tokenizing here fills the cache that the other
        # ranks read in ``setup`` instead of all of them tokenizing at once.
        if self.cache:
            self._prepare()

    def setup(self, stage: str | None = None) -> None:
        self._prepare()

    # -- loaders ----------------------------------------------------------------------------------
    def train_dataset(self) -> torch.utils.data.Dataset:
        if self.packing:
            return PackedSamples(self.train_data, pack_indices(self.train_data.lengths, self.max_seq_length))
        return self.train_data

    def _batches_done(self) -> int:
        """Training batches consumed so far by this run (restored from the checkpoint on resume)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.ready if self.trainer else 0

    def train_dataloader(self) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        dataset = self.train_dataset()
        sampler = ResumableSampler(
            dataset,
            world,
            rank,
            shuffle=True,
            seed=self.seed,
            batch_size=self.batch_size,
            batches_done=self._batches_done,
            lengths=self.train_data.lengths if self.group_by_length else None,
        )
        pad_id = self.tokenizer.pad_token_id
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=partial(collate_packed if self.packing else pad_batch, pad_id=pad_id),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_data,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=partial(pad_batch, pad_id=self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
