"""LoHa: low-rank Hadamard product (Hyeon-Woo et al. 2021, FedPara, arXiv 2108.06098).

A frozen linear map ``W`` gets an update that is the elementwise (Hadamard) product of two rank-``r``
products (paper eq. 2; scaled by ``alpha / r`` as in LyCORIS and Hugging Face peft)::

    h = W x + Delta W x,      Delta W = (alpha / r) * (W1a W1b) ⊙ (W2a W2b)
    W1a, W2a: out x r,   W1b, W2b: r x in

``Delta W`` can reach rank ``r^2`` with the parameters of a rank-``2r`` LoRA. As in peft, ``W1a``,
``W1b`` and ``W2a`` start Kaiming-uniform and ``W2b`` at 0, so the wrapped model starts exactly at the
base model. Layers hold the factors under peft's names (``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``,
``hada_w2_b``), so the peft export is a rename of the prefix. Rank and module dropout: see
:mod:`litpeft.methods.lycoris`. A weight update: :meth:`LoHa.merge` adds ``Delta W`` to each base weight.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from litpeft.methods.lycoris import LycorisLinear, LycorisMethod


class HadamardDelta(torch.autograd.Function):
    """``s (W1a W1b) ⊙ (W2a W2b)`` that keeps only the four factors for the backward pass (which rebuilds
    each product), not the two ``out x in`` products autograd would keep per layer."""

    @staticmethod
    def forward(
        ctx: Any, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: float
    ) -> torch.Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return (w1a @ w1b) * (w2a @ w2b) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scale
        g1 = grad * (w2a @ w2b)  # d loss / d (W1a W1b)
        g2 = grad * (w1a @ w1b)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2, None


class LoHaLinear(LycorisLinear):
    """``base_layer(x) + (alpha / r) ((W1a W1b) ⊙ (W2a W2b)) x`` around an ``nn.Linear`` or GPT-2 ``Conv1D``."""

    def __init__(
        self, base_layer: nn.Module, r: int, alpha: float, rank_dropout: float, module_dropout: float
    ) -> None:
        super().__init__(base_layer, r, alpha, rank_dropout, module_dropout)
        out, in_ = self.out_features, self.in_features
        self.hada_w1_a, self.hada_w1_b = self.factor(out, r), self.factor(r, in_)
        self.hada_w2_a, self.hada_w2_b = self.factor(out, r), self.factor(r, in_)
        for w in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):  # peft's order of draws
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        nn.init.zeros_(self.hada_w2_b)  # one zero factor: Delta W = 0 at the start

    def delta_weight(self) -> torch.Tensor:
        return HadamardDelta.apply(
            self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scaling
        )

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        """``Delta W x`` as a rank-``r^2`` product, ``A (B x)``, where that costs less than ``Delta W``:
        ``(W1a W1b) ⊙ (W2a W2b) = A B`` with ``A[o, (p, q)] = W1a[o, p] W2a[o, q]`` and
        ``B[(p, q), i] = W1b[p, i] W2b[q, i]`` (row-wise Khatri-Rao products)."""
        r2 = self.hada_w1_a.shape[1] ** 2
        if r2 * (self.in_features + self.out_features) >= self.in_features * self.out_features:
            return super().delta_output(x)
        a = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).flatten(1)  # out x r^2
        b = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).flatten(0, 1)  # r^2 x in
        return F.linear(F.linear(x.to(a.dtype), b) * self.scaling, a)


class LoHa(LycorisMethod):
    """LoHa on the selected linear layers (``nn.Linear`` and GPT-2's ``Conv1D``); peft's ``LoHaConfig``.

    Args:
        r: rank of each of the two products (``Delta W`` has rank up to ``r^2``).
        alpha: scaling numerator; ``Delta W`` is scaled by ``alpha / r``.
        rank_dropout: in training, the probability of dropping each output row of ``Delta W`` (the kept
            rows are rescaled by 1 / their share).
        module_dropout: in training, the probability of skipping a layer's whole update for a step.
        target_modules: layer names (suffix match), a regex (full match) or ``"all-linear"``, as LoRA's.
    """

    name = "loha"
    learning_rate = 1e-3  # configs/loha.yaml
    layer = LoHaLinear
    peft_type = "LOHA"

    def __init__(
        self,
        r: int = 8,
        alpha: float = 8.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
    ) -> None:
        self.check_common(r, alpha, rank_dropout, module_dropout, target_modules)
