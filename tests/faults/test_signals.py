"""SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop) in the middle of a run: no traceback, a non-zero exit,
and the resume ends bit for bit where the uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from harness import Run, assert_same_adapter, one_error_line


@pytest.mark.parametrize("kind", ["sigint", "sigterm"])
def test_signal_then_resume_is_bit_identical(
    zygote: Any, reference: Any, fault_data: Path, tmp_path: Path, kind: str
) -> None:
    ref, _ = reference("lora")
    run = Run(zygote, tmp_path / "run", fault_data)
    rc, out = run.fit(fault={"kind": kind, "step": 8})
    assert "Traceback" not in out, out[-3000:]
    if kind == "sigterm":  # Lightning's SIGTERM exit used to be 0, as if the run had finished
        assert rc == 143, out[-3000:]
        assert "stopped by SIGTERM" in one_error_line(out)
    else:
        assert rc == 1, out[-3000:]  # Lightning's graceful Ctrl-C
    assert not run.adapter.exists()  # an interrupted run is not a finished one
    out = run.finish()
    assert "litpeft: resuming from" in out
    assert_same_adapter(ref.adapter, run.adapter)
