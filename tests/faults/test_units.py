"""In-process checks of the pieces behind the fault suite: the RNG state, choosing the checkpoint to
resume, the run-directory lock."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from litpeft.resume import find_last_checkpoint
from litpeft.rng_state import capture_rng, restore_rng
from litpeft.run_lock import RunLock, RunLockedError


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    torch.save(capture_rng(), tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_last_is_the_newest_checkpoint_that_loads(tmp_path: Path) -> None:
    torch.save({"global_step": 3}, tmp_path / "epoch=0-step=3.ckpt")
    torch.save({"global_step": 6}, tmp_path / "epoch=0-step=6.ckpt")
    (tmp_path / "last.ckpt").write_bytes((tmp_path / "epoch=0-step=6.ckpt").read_bytes()[:40])  # truncated
    (tmp_path / ".last.ckpt.tmp123").write_bytes(b"")  # a killed save's temporary
    os.utime(tmp_path / "epoch=0-step=3.ckpt", ns=(1, 1))
    assert find_last_checkpoint([tmp_path]) == (tmp_path / "epoch=0-step=6.ckpt", 6)
    assert find_last_checkpoint([tmp_path / "missing"]) is None


def test_run_lock_names_its_holder_and_is_released(tmp_path: Path) -> None:
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(
        RunLockedError, match=rf"in use by another fit \(pid {os.getpid()} on host .*, started "
    ):
        RunLock(tmp_path).acquire()
    first.release()
    second = RunLock(tmp_path)
    second.acquire()
    assert second.held
    second.release()


def test_a_sharded_checkpoint_directory_counts_with_its_meta_step(tmp_path: Path) -> None:
    (tmp_path / "last.ckpt").mkdir()
    torch.save({"global_step": 9}, tmp_path / "last.ckpt" / "meta.pt")
    (tmp_path / "epoch=0-step=3.ckpt").mkdir()  # no meta.pt yet: an unfinished sharded save
    os.utime(tmp_path / "last.ckpt", ns=(1, 1))
    assert find_last_checkpoint([tmp_path]) == (tmp_path / "last.ckpt", 9)
