"""One fit per run directory: a lock file held for the whole run.

Two fits in the same ``default_root_dir`` share ``version_N``, checkpoints and metrics, and one of them
crashes or overwrites the other's adapter. :class:`RunLock` takes an exclusive ``fcntl.flock`` on
``<run dir>/.litpeft.lock``; the kernel releases it when the process exits, however it exits (kill -9
included), so a crashed run never leaves a stale lock. A second fit stops with one line naming the holder.
Under DDP/FSDP only global rank 0 takes it: all ranks of one run share the directory, and every run has a
rank 0. Over NFS, ``flock`` needs NFSv4 (Linux emulates
it with byte-range locks).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from litpeft.errors import LitPeftError
from litpeft.files import remove

LOCK_NAME = ".litpeft.lock"


class RunLockedError(LitPeftError):
    """Another process holds the run directory."""


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    return text or "a process that has not written its name yet"


class RunLock:
    """An exclusive lock on a run directory, released by :meth:`release` or when the process ends."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLockedError` naming the holder (pid, host, start time)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"run directory {self.directory} is in use by another fit ({holder}); wait for it to end "
                "or set another trainer.default_root_dir"
            ) from None
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def remove_stale_temporaries(directory: Path) -> None:
    """Delete the hidden ``.<name>.tmp<pid>`` copies of saves a killed process left (only under the lock)."""
    if directory.is_dir():
        for tmp in directory.glob(".*.tmp*"):
            remove(tmp)


class RunLockCallback(Callback):
    """Hold :class:`RunLock` on ``trainer.default_root_dir`` (global rank 0) until the run ends.

    ``litpeft fit`` calls :meth:`acquire` before ``Trainer.fit`` (:func:`litpeft.resume.lock_run`), so a
    second fit stops before Lightning creates a logger version or anything else in the directory; with the
    Python API the lock is taken in ``setup("fit")`` and the verdict is broadcast to all ranks.
    """

    def __init__(self, cleanup_dirs: list[Path] | None = None) -> None:
        self.cleanup_dirs = cleanup_dirs or []
        self.lock: RunLock | None = None

    def acquire(self, trainer: pl.Trainer) -> None:
        """On global rank 0: take the lock (or raise :class:`RunLockedError`), then delete the temporary
        files that killed saves left in the checkpoint directories."""
        if not trainer.is_global_zero or self.lock is not None:
            return
        lock = RunLock(trainer.default_root_dir)
        lock.acquire()
        self.lock = lock
        for d in self.cleanup_dirs:
            remove_stale_temporaries(d)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        error = None
        try:
            self.acquire(trainer)
        except RunLockedError as e:
            error = str(e)
        error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            raise RunLockedError(error)

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: Any) -> None:
        if not isinstance(exception, RunLockedError):
            self._release()
