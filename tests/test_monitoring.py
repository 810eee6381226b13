"""What a run logs about itself (tokens/s, loss tokens/s, MFU, peak memory) and the FLOP estimate behind MFU."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from litpeft import monitoring
from litpeft.loss import IGNORE_INDEX
from litpeft.methods import LoRA, PromptTuning
from litpeft.module import PeftLM


def _batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of 3 rows with prompts of varying length: tokens and loss tokens differ per batch."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(3, 250, (3, 12), generator=g)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        for row in range(3):
            length, prompt = (
                int(torch.randint(6, 13, (1,), generator=g)),
                int(torch.randint(1, 5, (1,), generator=g)),
            )
            mask[row, length:] = 0
            labels[row, length:] = IGNORE_INDEX
            labels[row, :prompt] = IGNORE_INDEX
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


@pytest.mark.parametrize("method", [LoRA(r=4), PromptTuning(num_virtual_tokens=4)])
def test_training_flops_match_torch_flop_counter(method) -> None:
    """The estimate (4N + 2N_trainable per token, the head at loss positions) against torch's own count of
    one forward + backward; they differ only by attention's sequence-length term (small at 16 tokens)."""
    module = PeftLM("tiny:llama", method=method)
    module.configure_model()
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX
    loss_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = module.loss_and_accuracy({"input_ids": ids, "labels": labels})
        loss.backward()
    per_token, per_loss_token = monitoring.training_flops(module.model)
    positions = ids.numel() + (4 * 2 if isinstance(method, PromptTuning) else 0)  # virtual tokens run too
    estimate = per_token * positions + per_loss_token * loss_tokens
    assert estimate == pytest.approx(counter.get_total_flops(), rel=0.1)


def test_peak_memory_on_the_cpu_is_the_process_high_water_mark() -> None:
    name, gb = monitoring.peak_memory(torch.device("cpu"))
    status = Path("/proc/self/status").read_text()
    vm_hwm_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    assert name == "perf/peak_rss_gb"
    assert gb == pytest.approx(vm_hwm_kb * 1024 / 1e9, rel=0.05)


def _fit(tmp_path: Path, batches: list[dict[str, torch.Tensor]], log_every: int) -> list[dict[str, str]]:
    L.seed_everything(0)
    module = PeftLM("tiny:llama", method=LoRA(r=2), adapter_dir=str(tmp_path / "adapter"))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=len(batches),
        log_every_n_steps=log_every,
        logger=CSVLogger(tmp_path),  # CSV stays available; the CLI's default is TensorBoard
        callbacks=[monitoring.SpeedMonitor()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        return [row for row in csv.DictReader(f) if row.get("perf/tokens_per_sec")]


def test_speed_is_logged_at_each_log_step_over_the_steps_since_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    peak = 1e9  # a made-up peak: the CPU has none in Lightning's table, so MFU is left out there
    monkeypatch.setattr(monitoring, "device_peak_flops", lambda trainer: peak)
    batches = _batches(6)
    rows = _fit(tmp_path, batches, log_every=2)
    assert [int(r["step"]) for r in rows] == [1, 3, 5]
    module = PeftLM("tiny:llama", method=LoRA(r=2))
    module.configure_model()
    per_token, per_loss_token = monitoring.training_flops(module.model)
    for row, window in zip(rows, [batches[0:2], batches[2:4], batches[4:6]], strict=True):
        tokens = sum(int(b["attention_mask"].sum()) for b in window)
        loss_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window)
        positions = sum(b["input_ids"].numel() for b in window)
        tokens_per_sec = float(row["perf/tokens_per_sec"])
        seconds = tokens / tokens_per_sec  # the same window for every rate of the row
        assert float(row["perf/loss_tokens_per_sec"]) * seconds == pytest.approx(loss_tokens, rel=1e-6)
        flops = per_token * positions + per_loss_token * loss_tokens
        assert float(row["perf/mfu"]) == pytest.approx(flops / seconds / peak, rel=1e-6)
        assert 0 < float(row["perf/peak_rss_gb"]) < 1000
        assert "perf/peak_cuda_memory_gb" not in row or not row["perf/peak_cuda_memory_gb"]


def test_no_mfu_without_a_known_peak(tmp_path: Path) -> None:
    rows = _fit(tmp_path, _batches(2), log_every=1)
    assert len(rows) == 2 and all(not r.get("perf/mfu") for r in rows)
    assert monitoring.device_peak_flops(L.Trainer(accelerator="cpu", logger=False)) is None


def test_hyperparameters_are_flat_with_a_key_per_value() -> None:
    from litpeft.monitoring import hyperparameters

    config = {
        "seed_everything": 42,
        "model": {
            "class_path": "litpeft.module.PeftLM",
            "init_args": {"method": {"class_path": "X", "init_args": {"r": 8, "targets": ["q", "v"]}}},
        },
        "trainer": {"callbacks": [{"class_path": "C", "init_args": {"every": 2}}], "precision": None},
        "ckpt_path": Path("runs/last.ckpt"),
    }
    assert hyperparameters(config) == {
        "seed_everything": 42,
        "model": "litpeft.module.PeftLM",
        "model/method": "X",
        "model/method/r": 8,
        "model/method/targets/0": "q",
        "model/method/targets/1": "v",
        "trainer/callbacks/0": "C",
        "trainer/callbacks/0/every": 2,
        "trainer/precision": None,
        "ckpt_path": "runs/last.ckpt",
    }
