"""Fault injection inside a forked ``litpeft`` run: count events, then kill, signal, pause or fill the disk.

Events, counted in the order they happen: a training step (``PeftLM.training_step``), each ``write`` to a
file opened in binary write mode with the builtin ``open`` (checkpoints, adapter weights), each
``os.fsync`` and each ``os.replace``. A fault fires at event number ``at``:

* ``kill``: SIGKILL; inside a ``write`` half of the data is written first (a kill mid-save);
* ``sigint`` / ``sigterm``: the signal, delivered to this process as a user or a scheduler would;
* ``pause``: touch ``<dir>/paused``, wait for ``<dir>/resume`` (two fits at once);
* ``disk_full``: from then on (from the start without ``at``/``step``) every binary write to a path
  containing ``match`` (default: any) writes half its data and raises ENOSPC.

Instead of an event number, ``step: n`` fires at the training step that starts with ``global_step == n``;
``kill`` with ``replace_to: name`` kills just before the first ``os.replace`` onto a path ending in ``name``.
"""

from __future__ import annotations

import builtins
import errno
import os
import signal
import time
from pathlib import Path
from typing import Any

from litpeft.module import PeftLM

COUNT: dict[str, int | None] = {"events": 0, "first_step": None}


def _write_half(f: Any, data: Any) -> None:
    view = memoryview(data).cast("B")
    f.write(view[: len(view) // 2])
    f.flush()


def install(fault: dict[str, Any]) -> None:
    kind, at = fault.get("kind"), fault.get("at", -1)
    state = {"disk_full": False}

    def event(in_write: Any = None, name: str = "", step: int | None = None) -> None:
        COUNT["events"] = (COUNT["events"] or 0) + 1
        hit = COUNT["events"] == at or (step is not None and step == fault.get("step"))
        if kind == "disk_full":
            state["disk_full"] |= hit or (at == -1 and "step" not in fault)
            matched = in_write is not None and fault.get("match", "") in name
            if not (state["disk_full"] and matched):
                return
        elif not hit:
            return
        if kind == "kill":
            if in_write is not None:
                _write_half(*in_write)
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind in ("sigint", "sigterm"):
            os.kill(os.getpid(), signal.SIGINT if kind == "sigint" else signal.SIGTERM)
        elif kind == "pause":
            directory = Path(fault["dir"])
            (directory / "paused").touch()
            while not (directory / "resume").exists():
                time.sleep(0.05)
        elif kind == "disk_full":
            _write_half(*in_write)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class Writer:
        def __init__(self, f: Any, name: str) -> None:
            self._f, self._name = f, name

        def write(self, data: Any) -> int:
            event((self._f, data), self._name)
            return self._f.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._f, name)

        def __enter__(self) -> Writer:
            self._f.__enter__()
            return self

        def __exit__(self, *exc: Any) -> Any:
            return self._f.__exit__(*exc)

        def __iter__(self) -> Any:
            return iter(self._f)

    real_open, real_fsync, real_replace = builtins.open, os.fsync, os.replace
    real_step = PeftLM.training_step

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        return Writer(f, str(file)) if "b" in mode and any(c in mode for c in "wax+") else f

    def fsync(fd: Any) -> None:
        event()
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        if kind == "kill" and fault.get("replace_to") and str(dst).endswith(fault["replace_to"]):
            os.kill(os.getpid(), signal.SIGKILL)
        event()
        real_replace(src, dst, **kwargs)

    def training_step(self: PeftLM, *args: Any, **kwargs: Any) -> Any:
        if COUNT["first_step"] is None:
            COUNT["first_step"] = self.trainer.global_step
        event(step=self.trainer.global_step)
        return real_step(self, *args, **kwargs)

    builtins.open, os.fsync, os.replace = open_, fsync, replace
    PeftLM.training_step = training_step
