"""litpeft.heap: glibc's malloc_trim where there is one, nothing elsewhere."""

from __future__ import annotations

import pytest
import torch

from litpeft import heap
from litpeft.methods import LoRA
from litpeft.module import PeftLM


def test_trim_runs_on_linux_glibc_and_does_nothing_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    heap._glibc.cache_clear()
    assert heap.trim() is True  # this test machine runs Linux with glibc
    monkeypatch.setattr(heap.sys, "platform", "darwin")
    heap._glibc.cache_clear()
    assert heap.trim() is False
    monkeypatch.setattr(heap.sys, "platform", "linux")
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))  # musl
    heap._glibc.cache_clear()
    assert heap.trim() is False
    heap._glibc.cache_clear()


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_the_heap_is_trimmed_after_the_build_and_each_step_of_a_quantized_base(
    quantize: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(heap, "trim", lambda: calls.append(1) or True)
    module = PeftLM("tiny:llama", method=LoRA(r=4), quantize=quantize)
    module.configure_model()
    assert len(calls) == (2 if quantize else 1)  # after quantizing, and after the build
    module.on_train_batch_end(torch.tensor(0.0), {}, 0)
    assert len(calls) == (3 if quantize else 1)  # a step of a quantized base on the CPU
