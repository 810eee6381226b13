"""OFT: orthogonal finetuning (Qiu et al. 2023, arXiv 2306.07280).

The frozen weight is multiplied by a trainable block-diagonal orthogonal matrix ``R``, which keeps the
angles between the neurons (their hyperspherical energy, paper sec. 3): ``W' = W R^T``, applied to the
input, ``y = W' x = W (R^T x)`` (as a row vector, ``x R``). Each ``b x b`` block of ``R`` is the Cayley
transform of a skew-symmetric ``Q`` (paper eq. 4), of which only the upper triangle is trained
(``b (b - 1) / 2`` values a block). ``Q = 0``: ``R = I``, the base model.

This is Hugging Face peft's current OFT (0.21.2: ``oft_R`` holds one upper-triangle vector a block),
whose two parameterisations these are, exactly:

- ``use_cayley_neumann=True`` (peft's default): the truncated Neumann series of ``(I + Q)(I - Q)^-1``,
  ``I + 2 Q + 2 Q^2 + ... + 2 Q^(n-2) + Q^(n-1)`` for ``n = num_cayley_neumann_terms`` (``n = 3`` sums
  to ``Q^3`` like ``n = 4``, as peft does); orthogonal up to the truncation error;
- ``use_cayley_neumann=False``: the exact Cayley transform as peft solves it, ``(I - Q)(I + Q)^-1``
  (that is the Cayley transform of ``-Q``: an adapter keeps its parameterisation, peft's config says which).

``coft`` (constrained OFT, paper sec. 3.3) projects each block's ``Q`` back into a Frobenius ball of
radius ``eps / sqrt(blocks)`` before every use; ``block_share`` trains one block for all of a layer's
blocks; ``module_dropout`` (paper sec. 3.3's multiplicative dropout) replaces ``int(p * blocks)``
random blocks by ``I`` in training (peft 0.21.2 builds this layer but never calls it).
A weight update: :meth:`OFT.merge` replaces ``W`` by ``W R^T``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from litpeft.errors import LitPeftError
from litpeft.methods.base import (
    PeftLayer,
    PeftMethod,
    _is_int,
    check_arg,
    check_target_modules,
    find_targets,
    merge_layers,
    peft_target_names,
    replace_module,
)
from litpeft.methods.linear import in_out_features, layer_device, out_in_weight, with_weight

log = logging.getLogger(__name__)
PEFT_VERSION = "0.21.2"  # the peft whose OFT this is (0.18 changed the Neumann series; its loader checks)


def fit_blocks(in_features: int, value: int) -> int:
    """``value`` (a block size or a block count) moved to the nearest divisor of ``in_features``, the lower
    one on a tie; ``in_features`` when ``value`` exceeds it: peft's ``adjust_oft_parameters``."""
    if value >= in_features:
        return in_features
    higher = value
    while higher <= in_features and in_features % higher:
        higher += 1
    lower = value
    while lower > 1 and in_features % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def skew(vec: torch.Tensor, size: int) -> torch.Tensor:
    """``(blocks, size * (size - 1) / 2)`` upper triangles -> ``(blocks, size, size)`` skew-symmetric ``Q``."""
    rows, cols = torch.triu_indices(size, size, 1, device=vec.device)
    q = vec.new_zeros(vec.shape[0], size, size)
    q[:, rows, cols] = vec
    return q - q.transpose(-2, -1)


def cayley(vec: torch.Tensor, size: int, neumann: bool, terms: int) -> torch.Tensor:
    """The orthogonal blocks ``(blocks, size, size)`` of the upper triangles ``vec`` (see the module doc)."""
    q = skew(vec, size)
    eye = torch.eye(size, device=vec.device, dtype=vec.dtype).expand_as(q)
    if not neumann:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    r = eye + 2 * q
    if terms > 2:
        power = q @ q
        r = r + 2 * power
        for _ in range(3, terms - 1):
            power = power @ q
            r = r + 2 * power
        r = r + power @ q
    return r


def constrained(vec: torch.Tensor, size: int, eps: float) -> torch.Tensor:
    """COFT's projection: each block's ``Q`` scaled into the Frobenius ball of radius ``eps / sqrt(blocks)``."""
    radius = eps / math.sqrt(vec.shape[0])
    norm = torch.linalg.matrix_norm(skew(vec, size), keepdim=False)[:, None]
    return torch.where(norm <= radius, vec, vec * (radius / norm))


class OFTRotation(nn.Module):
    """The trainable upper triangles (``weight``: blocks x ``b (b - 1) / 2``; one block when shared) and
    the orthogonal blocks they give. Named as peft's ``oft_R`` module, so the state dicts match."""

    def __init__(self, blocks: int, size: int, method: OFT, device: torch.device) -> None:
        super().__init__()
        self.blocks, self.size = blocks, size
        self.coft, self.eps, self.dropout = method.coft, method.eps, method.module_dropout
        self.neumann, self.terms = method.use_cayley_neumann, method.num_cayley_neumann_terms
        stored = 1 if method.block_share else blocks
        self.weight = nn.Parameter(torch.zeros(stored, size * (size - 1) // 2, device=device))

    def rotations(self, dropout: bool = False) -> torch.Tensor:
        """The ``(blocks, b, b)`` orthogonal blocks of ``R`` (with COFT's projection written back first);
        ``dropout``: with ``module_dropout``'s identity blocks."""
        if self.coft:
            with torch.no_grad():
                self.weight.copy_(constrained(self.weight, self.size, self.eps))
        r = cayley(self.weight, self.size, self.neumann, self.terms)
        if dropout and self.dropout > 0 and r.shape[0] > 1:
            dropped = torch.zeros(r.shape[0], dtype=torch.bool, device=r.device)
            dropped[torch.randperm(r.shape[0])[: int(self.dropout * r.shape[0])].to(r.device)] = True
            r = torch.where(dropped[:, None, None], torch.eye(self.size, device=r.device, dtype=r.dtype), r)
        return r.expand(self.blocks, -1, -1)

    def matrix(self) -> torch.Tensor:
        """``R`` itself (no dropout): ``in x in``, block diagonal."""
        return torch.block_diag(*self.rotations())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x R``: each block of ``size`` features of the input rotated by its block."""
        r = self.rotations(dropout=self.training)
        blocks = x.to(r.dtype).reshape(*x.shape[:-1], self.blocks, self.size)
        return torch.einsum("...rk,rkc->...rc", blocks, r).reshape(x.shape)


class OFTLinear(nn.Module, PeftLayer):
    """``base_layer(x R)``: the input rotated by the block-diagonal ``R`` (``oft_R``), then the frozen layer."""

    def __init__(self, base_layer: nn.Module, method: OFT) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_out_features(base_layer)
        blocks, size = method.blocks_for(self.in_features)
        self.oft_R = OFTRotation(blocks, size, method, layer_device(base_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x)
        return self.base_layer(self.oft_R(x).to(x.dtype))

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base layer with ``W R^T`` as its weight: in place for a float ``nn.Linear`` / ``Conv1D``, else
        (a quantized base) a plain layer of the same kind."""
        base = self.base_layer
        return with_weight(base, out_in_weight(base).float() @ self.oft_R.matrix().float().T)


class OFT(PeftMethod):
    """OFT on the selected linear layers (``nn.Linear`` and GPT-2's ``Conv1D``; peft has no OFT for the
    latter, so its export is refused).

    Args:
        oft_block_size: the size ``b`` of ``R``'s blocks (``b (b - 1) / 2`` trained values a block); 0 to
            set ``r`` instead. One that does not divide a layer's input size is moved to the nearest divisor
            (a warning), as peft does.
        r: the number of blocks per layer instead (``oft_block_size`` must then be 0); moved likewise.
        target_modules: layer names (suffix match), a regex (full match) or ``"all-linear"``, as LoRA's.
        module_dropout: in training, this fraction of each layer's blocks is replaced by ``I`` (paper's
            multiplicative dropout); no effect with ``block_share``.
        coft: constrained OFT: ``Q`` stays within a ball of radius ``eps`` around 0.
        eps: COFT's radius (spread over a layer's blocks: ``eps / sqrt(blocks)`` each).
        block_share: one trained block shared by all of a layer's blocks.
        use_cayley_neumann: the Neumann series instead of the exact Cayley transform (peft's default).
        num_cayley_neumann_terms: the number of terms of the series (at least 2).
        bias: ``"none"`` only (peft's ``all`` / ``oft_only`` train biases: use BitFit for that).
    """

    name = "oft"
    learning_rate = 4e-4  # configs/oft.yaml
    mergeable = True
    exportable_to_peft = True

    def __init__(
        self,
        oft_block_size: int = 32,
        r: int = 0,
        target_modules: str | list[str] = "all-linear",
        module_dropout: float = 0.0,
        coft: bool = False,
        eps: float = 6e-5,
        block_share: bool = False,
        use_cayley_neumann: bool = True,
        num_cayley_neumann_terms: int = 5,
        bias: str = "none",
    ) -> None:
        check_arg(
            _is_int(oft_block_size) and oft_block_size >= 0,
            "oft_block_size",
            oft_block_size,
            "an integer >= 0",
        )
        check_arg(_is_int(r) and r >= 0, "r", r, "an integer >= 0")
        check_arg(
            (r == 0) != (oft_block_size == 0),
            "r",
            r,
            f"set exactly one of r and oft_block_size (now {oft_block_size}), the other 0: "
            "r x oft_block_size is the layer's input size",
        )
        check_target_modules(target_modules)
        check_arg(
            0 <= module_dropout < 1, "module_dropout", module_dropout, "a dropout probability is in [0, 1)"
        )
        check_arg(eps > 0, "eps", eps, "COFT's radius is positive")
        check_arg(
            _is_int(num_cayley_neumann_terms) and num_cayley_neumann_terms >= 2,
            "num_cayley_neumann_terms",
            num_cayley_neumann_terms,
            "at least 2 (with 1 the series is I and nothing trains)",
        )
        check_arg(
            bias == "none", "bias", bias, "'none' only: litpeft's OFT trains no biases (BitFit trains them)"
        )
        self.oft_block_size, self.r, self.module_dropout = oft_block_size, r, module_dropout
        self.coft, self.eps, self.block_share = coft, eps, block_share
        self.use_cayley_neumann, self.num_cayley_neumann_terms = use_cayley_neumann, num_cayley_neumann_terms
        self.bias = bias
        self.target_modules = (
            list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules
        )

    def blocks_for(self, in_features: int) -> tuple[int, int]:
        """``(blocks, block size)`` of a layer with ``in_features`` inputs (peft's adjustment included)."""
        fitted = fit_blocks(in_features, self.oft_block_size or self.r)
        other = in_features // fitted
        return (other, fitted) if self.oft_block_size else (fitted, other)

    def inject(self, model: PreTrainedModel) -> None:
        names = find_targets(model, self.target_modules, (nn.Linear, Conv1D))
        given, what = (self.oft_block_size, "oft_block_size") if self.oft_block_size else (self.r, "r")
        for size in sorted({in_out_features(model.get_submodule(n))[0] for n in names}):
            if fit_blocks(size, given) != given:
                log.warning(
                    f"OFT: {what} {given} does not divide {size} inputs; using {fit_blocks(size, given)}"
                )
        for name in names:
            replace_module(model, name, OFTLinear(model.get_submodule(name), self))

    def merge(self, model: PreTrainedModel) -> PreTrainedModel:
        """Replace each adapted weight ``W`` by ``W R^T``; remove the OFT layers."""
        return merge_layers(model, OFTLinear)

    def to_peft(
        self, model: PreTrainedModel, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, OFTLinear)}
        conv1d = [
            n
            for n, m in layers.items()
            if isinstance(m.base_layer, Conv1D) or getattr(m.base_layer, "from_conv1d", False)
        ]
        if conv1d:
            raise LitPeftError(
                f"peft's OFT wraps nn.Linear layers only, and {conv1d[0]} is GPT-2's Conv1D: "
                "this adapter has no peft form (litpeft merge folds it into the weights)"
            )
        adapted = sorted(k.rsplit(".oft_R.weight", 1)[0] for k in state if k.endswith(".oft_R.weight"))
        config = {
            "peft_type": "OFT",
            "task_type": "CAUSAL_LM",
            "peft_version": PEFT_VERSION,
            "r": self.r,
            "oft_block_size": self.oft_block_size,
            "target_modules": peft_target_names(model, adapted),
            "module_dropout": self.module_dropout,
            "coft": self.coft,
            "eps": self.eps,
            "block_share": self.block_share,
            "use_cayley_neumann": self.use_cayley_neumann,
            "num_cayley_neumann_terms": self.num_cayley_neumann_terms,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_weights": True,
            "inference_mode": True,
        }
        return config, {"base_model.model." + k: v for k, v in state.items()}
