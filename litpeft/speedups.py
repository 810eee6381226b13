"""Switches for litpeft's measured speed changes: all on by default, off only to measure what each is worth.

``scripts/benchmark.py --ablate NAME`` turns one off on the real code path (no copied old code) and
compares; docs/benchmark.md gives the figures. Each switch is read where its change lives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields


@dataclass
class Speedups:
    """Which speed changes are active (process-wide).

    Attributes:
        cpu_sdpa: on the CPU, attention in fp32 through :data:`litpeft.methods.attention.CPU_SDPA`
            (PyTorch's bf16 CPU flash kernel is several times slower).
        lora_forward: one cast of a LoRA layer's input under autocast, shared by the base layer and the
            branch, and the scaling applied to the rank-r activations instead of the output.
        padding_mask: drop the attention mask of right-padded batches (plain causal attention).
        frozen_bf16: under ``*-mixed``, store frozen linear weights in the autocast dtype once instead of
            letting autocast cast them at every use (:func:`litpeft.precision.store_frozen_linears`).
        fast_dropout: CPU dropout masks from 16-bit slices of 64-bit random words
            (:class:`litpeft.methods.base.Dropout`).
    """

    cpu_sdpa: bool = True
    lora_forward: bool = True
    padding_mask: bool = True
    frozen_bf16: bool = True
    fast_dropout: bool = True

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


SPEEDUPS = Speedups()


def switch_off(names: Sequence[str]) -> None:
    """Turn the speed changes ``names`` off for the rest of this process (a benchmark worker)."""
    for name in names:
        if name not in Speedups.names():
            raise ValueError(f"unknown speed change {name!r} (known: {', '.join(Speedups.names())})")
        setattr(SPEEDUPS, name, False)


@contextlib.contextmanager
def speedups_off(names: Sequence[str]) -> Iterator[None]:
    """The speed changes ``names`` off inside the block, as they were after it (in-process A/B)."""
    before = {name: getattr(SPEEDUPS, name) for name in Speedups.names()}
    try:
        switch_off(names)
        yield
    finally:
        for name, value in before.items():
            setattr(SPEEDUPS, name, value)
