"""Two fits in one run directory: the second refuses with one line naming the first (item 4 of #20)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from harness import Run, assert_same_adapter, one_error_line


def test_second_fit_on_a_busy_run_directory_refuses(
    zygote: Any, reference: Any, fault_data: Path, tmp_path: Path
) -> None:
    ref, _ = reference("lora")
    first = Run(zygote, tmp_path / "run", fault_data)
    pid, log = first.start(fault={"kind": "pause", "step": 3, "dir": str(tmp_path)})
    deadline = time.monotonic() + 300
    while not (tmp_path / "paused").exists():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    before = sorted(p.relative_to(first.root) for p in first.root.rglob("*"))
    second = Run(zygote, tmp_path / "run", fault_data)
    second.n = 10  # its own log file
    rc, out = second.fit()
    assert rc == 2, out[-3000:]
    line = one_error_line(out)
    assert f"in use by another fit (pid {pid} on host" in line and "started" in line
    assert sorted(p.relative_to(first.root) for p in first.root.rglob("*")) == before  # wrote nothing
    (tmp_path / "resume").touch()
    assert zygote.wait(pid) == 0, log.read_text()[-3000:]
    assert_same_adapter(ref.adapter, first.adapter)
    # the lock went with the first process: the next fit in the directory runs
    rc, out = second.fit(resume=True)
    assert rc == 0, out[-3000:]
