"""What each matrix cell is expected to do besides passing: refuse (a family refusal), or fail a check
because of a known defect (a strict xfail that turns into a failure once the fix is merged)."""

from __future__ import annotations

import pytest
from matrix_cells import Cell

#: (family, method) -> a phrase the one-line refusal contains
REFUSALS: dict[tuple[str, str], str] = {
    **{
        ("olmo2", m): "normalizes the keys of all heads together"
        for m in ("llama_adapter", "llama_adapter_v2")
    },
    # (IA)^3's default l_ff names down_proj, which Qwen3-MoE's experts hold as one 3-D tensor
    ("qwen3_moe", "ia3"): "experts hold down_proj as 3-D tensors",
    # LoRA inits that decompose a float base weight (GPT-2's Conv1D: peft decomposes it untransposed)
    ("gpt2", "loftq"): "does not work on GPT-2's Conv1D layers",
}
#: method -> the phrase of its refusal on an nf4 base (model.quantize)
NF4_REFUSALS: dict[str, str] = {
    "pissa": "decomposes the float base weight, but the layer",
    "loftq": "leave model.quantize null",
}

#: (family, method) -> {check: the known defect that makes it fail}; none at present (the last one, Gemma's
#: sliding window hiding peft's prefix but not litpeft's, is fixed in litpeft/methods/prefix.py)
KNOWN: dict[tuple[str, str], dict[str, str]] = {}


class KnownDefect(AssertionError):
    """Raised by a cell whose only failing checks are the known ones (``pytest.mark.xfail(raises=...)``)."""


def refusal(cell: Cell) -> str | None:
    """The phrase the cell's refusal must contain; ``None``: the cell must train."""
    if cell.quantize is not None and cell.method in NF4_REFUSALS:
        return NF4_REFUSALS[cell.method]
    return REFUSALS.get((cell.family, cell.method))


def known_failures(cell: Cell) -> dict[str, str]:
    """check name -> the defect that makes it fail in ``cell``."""
    if refusal(cell) is not None:
        return {}
    known = KNOWN.get((cell.family, cell.method), {})
    return {check: why for check, why in known.items() if check in checks(cell)}


def checks(cell: Cell) -> tuple[str, ...]:
    """The checks a trained cell runs (the peft export only in fp32 on a plain base)."""
    base = ("trainables", "packed", "generate", "reload")
    return (*base, "peft") if cell.precision == "32-true" and cell.quantize is None else base


def param(cell: Cell) -> pytest.param:
    """``cell`` as a test parameter, strictly xfailed with the reasons of its known failures."""
    known = known_failures(cell)
    marks = []
    if known:
        reason = "; ".join(f"{check}: {why}" for check, why in known.items())
        marks.append(pytest.mark.xfail(strict=True, raises=KnownDefect, reason=reason))
    return pytest.param(cell, id=cell.id, marks=marks)
