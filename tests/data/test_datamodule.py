"""InstructionDataModule: deterministic and resumable shuffling, length-grouped batches, the summary line,
DataLoader workers, and ``fit`` end to end with packing (a second fit reads the cache)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from litpeft.data import InstructionDataModule, ResumableSampler
from litpeft.methods import LoRA
from litpeft.module import PeftLM


def write_rows(path: Path, n: int) -> str:
    rows = [{"instruction": "word " * (i % 7 + 1), "output": "x" * (i % 5 + 1)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def order(sampler: ResumableSampler, epoch: int = 0) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_shuffling_is_deterministic_per_seed_and_epoch() -> None:
    data = list(range(50))
    make = lambda seed: ResumableSampler(data, 1, 0, shuffle=True, seed=seed, batch_size=4)  # noqa: E731
    assert order(make(3)) == order(make(3))
    assert sorted(order(make(3))) == data
    assert order(make(3), epoch=1) != order(make(3), epoch=0)
    assert order(make(4)) != order(make(3))


@pytest.mark.parametrize("grouped", [False, True])
def test_resumed_epoch_skips_the_batches_already_seen(grouped: bool) -> None:
    data = list(range(30))
    lengths = [(i * 7) % 11 for i in data] if grouped else None
    full = order(ResumableSampler(data, 1, 0, True, 5, batch_size=4, lengths=lengths), epoch=2)
    # 30 samples in batches of 4: 8 batches per epoch. 2 epochs + 3 batches done -> epoch 2, skip 3,
    # whatever epoch Lightning's counter says.
    resumed = ResumableSampler(
        data, 1, 0, True, 5, batch_size=4, batches_done=lambda: 2 * 8 + 3, lengths=lengths
    )
    assert order(resumed, epoch=7) == full[12:]


@pytest.mark.parametrize("grouped", [False, True])
def test_ranks_share_the_data_without_overlap(grouped: bool) -> None:
    data = list(range(48))
    lengths = [(i * 5) % 13 for i in data] if grouped else None
    shards = [order(ResumableSampler(data, 3, r, True, 0, batch_size=4, lengths=lengths)) for r in range(3)]
    assert all(len(s) == 16 for s in shards)
    assert sorted(i for s in shards for i in s) == data


def test_length_grouped_batches_hold_similar_lengths() -> None:
    """With one group covering the epoch, the batches split the length-sorted samples into runs: no two
    batches' length ranges overlap; and their order is still shuffled."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 500, (64,), generator=g).tolist()
    sampler = ResumableSampler(list(range(64)), 1, 0, True, 0, batch_size=8, lengths=lengths, group_size=64)
    idx = order(sampler)
    assert sorted(idx) == list(range(64))
    batches = [[lengths[i] for i in idx[b : b + 8]] for b in range(0, 64, 8)]
    for a in batches:
        for b in batches:
            assert a is b or max(a) <= min(b) or max(b) <= min(a)
    assert [max(b) for b in batches] != sorted((max(b) for b in batches), reverse=True)
    # padding: far less than batches of the plain shuffle
    waste = lambda bs: sum(len(b) * max(b) - sum(b) for b in bs)  # noqa: E731
    plain = order(ResumableSampler(list(range(64)), 1, 0, True, 0, batch_size=8))
    assert waste(batches) < waste([[lengths[i] for i in plain[b : b + 8]] for b in range(0, 64, 8)]) / 2


def test_summary_line_counts_and_percentiles(tmp_path: Path, tok: Any, caplog: Any) -> None:
    path = write_rows(tmp_path / "t.jsonl", 40)
    dm = InstructionDataModule(path, val_fraction=0.25, max_seq_length=50, cache=False)
    dm.tokenizer = tok
    with caplog.at_level(logging.INFO):
        dm.setup()
    # independent: the ChatML text of a sample is one token per byte plus 4 special tokens
    full = lambda m: len(f"user\n{m[0]['content']}\nassistant\n{m[1]['content']}\n".encode()) + 4  # noqa: E731
    prompt = lambda m: len(f"user\n{m[0]['content']}\nassistant\n".encode()) + 3  # noqa: E731
    samples = dm.train_samples + dm.val_samples
    dropped = sum(prompt(m) >= 50 for m in samples)  # no answer token left inside 50 tokens
    truncated = sum(full(m) > 50 and prompt(m) < 50 for m in samples)
    train_kept = sum(prompt(m) < 50 for m in dm.train_samples)
    lengths = sorted(full(m) for m in dm.train_samples)
    nearest = lambda q: lengths[math.ceil(q * len(lengths)) - 1]  # noqa: E731
    assert dropped > 0 and truncated > 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data:")]
    assert lines == [
        f"data: {train_kept} train / {10 - sum(prompt(m) >= 50 for m in dm.val_samples)} val samples; "
        f"{truncated} truncated, {dropped} dropped (max_seq_length=50, truncation=truncate); "
        f"train tokens p50={nearest(0.5)} p90={nearest(0.9)} p99={nearest(0.99)} max={lengths[-1]}; "
        "tokenized, style chat_template"
    ]


def test_workers_give_the_same_batches(tmp_path: Path, tok: Any) -> None:
    path = write_rows(tmp_path / "t.jsonl", 12)
    batches = []
    for workers in (0, 1):
        dm = InstructionDataModule(path, val_fraction=0.0, batch_size=4, num_workers=workers, packing=True)
        dm.tokenizer = tok
        dm.setup()
        batches.append(list(dm.train_dataloader()))
    assert len(batches[0]) == len(batches[1]) > 0
    for a, b in zip(*batches, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "options", [{"packing": True}, {"group_by_length": True}], ids=["packing", "grouped"]
)
def test_fit_end_to_end_and_second_fit_reads_the_cache(tmp_path: Path, options: dict[str, Any]) -> None:
    path = write_rows(tmp_path / "t.jsonl", 24)
    stats = []
    for run in range(2):
        module = PeftLM(model="tiny:llama", method=LoRA(), adapter_dir=str(tmp_path / f"adapter{run}"))
        dm = InstructionDataModule(path, val_fraction=0.25, batch_size=4, prompt_style="chatml", **options)
        trainer = L.Trainer(
            max_steps=2,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=1,
            num_sanity_val_steps=0,
        )
        trainer.fit(module, datamodule=dm)
        assert trainer.global_step == 2
        assert math.isfinite(trainer.callback_metrics["train/loss"].item())
        stats.append(dm.stats)
    assert stats[0]["train"]["tokenized"] == 18 and stats[0]["val"]["tokenized"] == 6
    assert stats[1]["train"]["tokenized"] == 0 and stats[1]["val"]["tokenized"] == 0
    saved = yaml.safe_load((tmp_path / "adapter1" / "adapter.yaml").read_text())
    assert saved["prompt_style"] == "chatml"


class RecordBatches(L.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, int, torch.Tensor]] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        self.seen.append((trainer.current_epoch, batch_idx, batch["input_ids"].clone()))


def test_resumed_fit_sees_the_same_batches(tmp_path: Path) -> None:
    """A run resumed from a mid-epoch checkpoint trains on exactly the batches the whole run trained on
    after that step, in the same order, across epoch ends too (5 batches an epoch here)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    path = write_rows(tmp_path / "t.jsonl", 20)

    def fit(ckpt: str | None = None, save: bool = False) -> list[tuple[int, int, torch.Tensor]]:
        record = RecordBatches()
        callbacks: list[L.Callback] = [record]
        if save:
            callbacks.append(ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1))
        trainer = L.Trainer(
            max_steps=9,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=save,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=callbacks,
        )
        dm = InstructionDataModule(path, val_fraction=0.0, batch_size=4)
        trainer.fit(
            PeftLM(model="tiny:llama", method=LoRA(), adapter_dir=str(tmp_path / "a")), dm, ckpt_path=ckpt
        )
        return record.seen

    def same(a: list[Any], b: list[Any]) -> bool:
        return len(a) == len(b) and all(
            x[:2] == y[:2] and torch.equal(x[2], y[2]) for x, y in zip(a, b, strict=True)
        )

    whole = fit(save=True)
    assert [(e, i) for e, i, _ in whole] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (0, 3),
        (0, 4),
        (1, 0),
        (1, 1),
        (1, 2),
        (1, 3),
    ]
    assert same(fit(str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt")), whole[3:])
    assert same(fit(str(tmp_path / "ckpt" / "epoch=1-step=6.ckpt")), whole[6:])
