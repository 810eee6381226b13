"""What each matrix cell is expected to do besides passing: refuse (a family refusal), or fail a check
because of a known defect (a strict xfail that turns into a failure once the fix is merged)."""

from __future__ import annotations

import pytest
from matrix_cells import Cell

SLIDING_PREFIX = (
    "new finding (litpeft/methods/prefix.py): on Gemma's sliding-window layers peft's prefix is a KV-cache "
    "entry that leaves the window for tokens more than sliding_window past it, while litpeft's prefix "
    "stays visible to every token, so the exported adapter's logits differ from litpeft's once a "
    "sequence is longer than the window (tiny models: 8 tokens; Gemma 2/3: 4096)"
)

#: (family, method) -> a phrase the one-line refusal contains
REFUSALS: dict[tuple[str, str], str] = {
    **{("gpt_neox", m): "has no head_dim" for m in ("prefix_tuning", "p_tuning_v2")},
    **{("gpt_neox", m): "has no head_dim" for m in ("llama_adapter", "llama_adapter_v2")},
    **{
        ("olmo2", m): "normalizes the keys of all heads together"
        for m in ("llama_adapter", "llama_adapter_v2")
    },
    # (IA)^3's default l_ff names down_proj, which Qwen3-MoE's experts hold as one 3-D tensor
    ("qwen3_moe", "ia3"): "experts hold down_proj as 3-D tensors",
}


class KnownDefect(AssertionError):
    """Raised by a cell whose only failing checks are the known ones (``pytest.mark.xfail(raises=...)``)."""


def refusal(cell: Cell) -> str | None:
    """The phrase the cell's refusal must contain; ``None``: the cell must train."""
    return REFUSALS.get((cell.family, cell.method))


def known_failures(cell: Cell) -> dict[str, str]:
    """check name -> the defect that makes it fail in ``cell``."""
    if refusal(cell) is not None:
        return {}
    known: dict[str, str] = {}
    m = cell.method
    if (
        cell.family in ("gemma2", "gemma3")
        and m in ("prefix_tuning", "p_tuning_v2")
        and "peft" in checks(cell)
    ):
        known["peft"] = SLIDING_PREFIX
    return known


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
