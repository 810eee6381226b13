"""Disk full while saving (a write that fails with ENOSPC half-way, tests/faults/plug.py): one error line,
the previous checkpoint intact and loadable, and a resume that ends where the uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import Run, assert_same_adapter, checkpoint_step, one_error_line


def _complete_checkpoints(run: Run) -> dict[str, int | None]:
    return {p.name: checkpoint_step(p) for p in sorted(run.checkpoints.iterdir())}


def test_disk_full_during_checkpoint_keeps_the_previous_one(
    zygote: Any, reference: Any, fault_data: Path, tmp_path: Path
) -> None:
    ref, _ = reference("lora")
    run = Run(zygote, tmp_path / "run", fault_data)
    rc, out = run.fit(fault={"kind": "disk_full", "step": 7, "match": ".ckpt"})  # at step 9's save
    assert rc == 2, out[-3000:]
    line = one_error_line(out)
    assert "cannot write checkpoint" in line and "No space left on device" in line
    # only complete files, no temporary left: the step-6 checkpoint under both names
    assert _complete_checkpoints(run) == {"epoch=0-step=6.ckpt": 6, "last.ckpt": 6}
    assert not run.adapter.exists()
    run.finish()  # space freed: resume from step 6
    assert_same_adapter(ref.adapter, run.adapter)


def test_disk_full_during_adapter_save_is_one_line_and_resumable(
    zygote: Any, reference: Any, fault_data: Path, tmp_path: Path
) -> None:
    ref, _ = reference("lora")
    run = Run(zygote, tmp_path / "run", fault_data)
    rc, out = run.fit(fault={"kind": "disk_full", "match": "adapter.safetensors"})
    assert rc == 2, out[-3000:]
    line = one_error_line(out)
    assert "cannot write adapter weights" in line and "No space left on device" in line
    assert not run.adapter.exists() or not any(run.adapter.iterdir())
    assert checkpoint_step(run.checkpoints / "last.ckpt") == 12
    rc, out = run.fit(resume=True)  # the finished run's checkpoint: no step left, the adapter is written
    assert rc == 0, out[-3000:]
    assert_same_adapter(ref.adapter, run.adapter)
