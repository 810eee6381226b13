"""LoKr: low-rank Kronecker product (Yeh et al. 2023, LyCORIS, arXiv 2309.14859, sec. 3.3).

A frozen linear map ``W`` (``out x in``) gets a Kronecker-product update (scaled by ``alpha / r``, as in
LyCORIS and Hugging Face peft)::

    h = W x + Delta W x,      Delta W = (alpha / r) * W1 ⊗ W2,      W1: a x c,  W2: b x d
    out = a * b,  in = c * d:  (a, b) = factorization(out),  (c, d) = factorization(in)

:func:`factorization` is peft's rule (``decompose_factor``). ``W2`` is the low-rank product
``W2a W2b`` (``b x r``, ``r x d``) when ``r < max(b, d) / 2``, else one full matrix; with
``decompose_both``, ``W1`` likewise (``r < max(a, c) / 2``). As in peft, ``W1`` (or ``W1a``) starts at 0
and the other factors Kaiming-uniform, so the wrapped model starts exactly at the base model. Layers hold
the factors under peft's names (``lokr_w1`` or ``lokr_w1_a`` / ``lokr_w1_b``, ``lokr_w2`` or
``lokr_w2_a`` / ``lokr_w2_b``), so the peft export is a rename of the prefix. Rank and module dropout:
see :mod:`litpeft.methods.lycoris`. A weight update: :meth:`LoKr.merge` adds ``Delta W`` to each weight.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from litpeft.methods.base import _is_int, check_arg
from litpeft.methods.lycoris import LycorisLinear, LycorisMethod


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n = dimension``: peft's rule for LoKr's Kronecker factors.

    ``(factor, dimension / factor)`` when ``factor`` divides ``dimension`` (in that order, as peft);
    otherwise, walking up the divisors ``m`` of ``dimension``, the last one not above ``factor`` (no
    bound for ``-1``) before ``m`` reaches ``dimension / m``, returned as ``(smaller, larger)``: near the
    square root for ``-1`` (``128 -> (8, 16)``, ``4096 -> (64, 64)``, a prime ``p -> (1, p)``).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m = 1
    for d in range(2, dimension + 1):
        if m >= dimension // m or d > bound:
            break
        if dimension % d == 0:
            m = d
    n = dimension // m
    return min(m, n), max(m, n)


def kaiming(weight: nn.Parameter) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class LoKrLinear(LycorisLinear):
    """``base_layer(x) + (alpha / r) (W1 ⊗ W2) x`` around an ``nn.Linear`` or GPT-2 ``Conv1D``."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        rank_dropout: float,
        module_dropout: float,
        decompose_both: bool = False,
        decompose_factor: int = -1,
        rank_dropout_scale: bool = False,
    ) -> None:
        super().__init__(base_layer, r, alpha, rank_dropout, module_dropout)
        self.rank_dropout_scale = rank_dropout_scale
        a, b = factorization(self.out_features, decompose_factor)
        c, d = factorization(self.in_features, decompose_factor)
        if decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a, self.lokr_w1_b = self.factor(a, r), self.factor(r, c)
            nn.init.zeros_(self.lokr_w1_a)
            kaiming(self.lokr_w1_b)
        else:
            self.lokr_w1 = self.factor(a, c)
            nn.init.zeros_(self.lokr_w1)  # W1 = 0: Delta W = 0 at the start
        if r < max(b, d) / 2:
            self.lokr_w2_a, self.lokr_w2_b = self.factor(b, r), self.factor(r, d)
            kaiming(self.lokr_w2_a)
            kaiming(self.lokr_w2_b)
        else:
            self.lokr_w2 = self.factor(b, d)
            kaiming(self.lokr_w2)

    def _w(self, i: int) -> torch.Tensor:
        full = getattr(self, f"lokr_w{i}", None)
        return full if full is not None else getattr(self, f"lokr_w{i}_a") @ getattr(self, f"lokr_w{i}_b")

    def delta_weight(self) -> torch.Tensor:
        return torch.kron(self._w(1), self._w(2)) * self.scaling

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        """``(W1 ⊗ W2) x`` without forming ``W1 ⊗ W2``: with ``x`` as a ``c x d`` matrix ``X``, the output
        is ``W1 X W2^T`` (``a x b``): ``b c (a + d)`` multiplications per token instead of ``a b c d``."""
        w1, w2 = self._w(1), self._w(2)
        xs = x.to(w1.dtype).unflatten(-1, (w1.shape[1], w2.shape[1]))
        return torch.matmul(w1, xs @ w2.T).flatten(-2) * self.scaling


class LoKr(LycorisMethod):
    """LoKr on the selected linear layers (``nn.Linear`` and GPT-2's ``Conv1D``); peft's ``LoKrConfig``.

    Args:
        r: rank of ``W2 = W2a W2b`` (and of ``W1`` with ``decompose_both``) where it is below half the
            factor's larger side; a full matrix there otherwise.
        alpha: scaling numerator; ``Delta W`` is scaled by ``alpha / r``.
        rank_dropout: in training, the probability of dropping each output row of ``Delta W``.
        module_dropout: in training, the probability of skipping a layer's whole update for a step.
        target_modules: layer names (suffix match), a regex (full match) or ``"all-linear"``, as LoRA's.
        decompose_both: also write ``W1`` as a rank-``r`` product (where ``r < max(a, c) / 2``).
        decompose_factor: the Kronecker factorization's ``factor`` (:func:`factorization`); ``-1``: the
            divisors nearest the square roots of ``out`` and ``in``.
        rank_dropout_scale: rescale the rows rank dropout keeps by 1 / their share (peft's default: no).
    """

    name = "lokr"
    learning_rate = 1e-3  # configs/lokr.yaml
    layer = LoKrLinear
    peft_type = "LOKR"

    def __init__(
        self,
        r: int = 8,
        alpha: float = 8.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        decompose_both: bool = False,
        decompose_factor: int = -1,
        rank_dropout_scale: bool = False,
    ) -> None:
        self.check_common(r, alpha, rank_dropout, module_dropout, target_modules)
        check_arg(
            _is_int(decompose_factor) and (decompose_factor == -1 or decompose_factor > 0),
            "decompose_factor",
            decompose_factor,
            "-1 (factors near the square root) or a positive integer",
        )
        self.decompose_both, self.decompose_factor = decompose_both, decompose_factor
        self.rank_dropout_scale = rank_dropout_scale

    def layer_args(self) -> dict[str, Any]:
        return {
            "decompose_both": self.decompose_both,
            "decompose_factor": self.decompose_factor,
            "rank_dropout_scale": self.rank_dropout_scale,
        }

    def peft_args(self) -> dict[str, Any]:
        return self.layer_args()
