"""What the methods that change a linear layer's weight share: the layer's ``(out, in)`` view whatever its
kind (``nn.Linear``, GPT-2's ``Conv1D``, a quantized layer), and the merge of a new weight into it.

A :class:`DeltaWeightLayer` (VeRA, AdaLoRA, LoHa, LoKr) defines only ``delta_weight()``; its merge adds
that to the base weight.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from litpeft.methods.base import PeftLayer
from litpeft.quantize import plain_layer


def out_in_weight(layer: nn.Module) -> torch.Tensor:
    """A linear layer's weight as ``(out, in)``: GPT-2's ``Conv1D`` transposed, a quantized one dequantized."""
    w = layer.weight
    if hasattr(w, "dequantize") and w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        w = w.dequantize()
    return w.T if isinstance(layer, Conv1D) else w


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    """A linear layer's ``(in, out)`` sizes without touching a quantized weight."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


def layer_device(layer: nn.Module) -> torch.device:
    return next(layer.parameters()).device


@torch.no_grad()
def with_weight(base: nn.Module, weight: torch.Tensor) -> nn.Module:
    """``base`` with the ``(out, in)`` ``weight`` (bias kept): in place for a float ``nn.Linear`` /
    ``Conv1D``, else (a quantized base) a plain layer of the same kind."""
    if type(base) not in (nn.Linear, Conv1D) or not base.weight.is_floating_point():
        return plain_layer(base, weight, getattr(base, "bias", None))
    base.weight.copy_(weight.T if isinstance(base, Conv1D) else weight)
    return base


class DeltaWeightLayer(PeftLayer):
    """Mixin for a layer ``base_layer(x) + Delta W x`` whose subclass defines :meth:`delta_weight`."""

    base_layer: nn.Module

    def delta_weight(self) -> torch.Tensor:
        """``Delta W`` as ``(out, in)``, scaling included."""
        raise NotImplementedError

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base layer with ``Delta W`` added (see :func:`with_weight`)."""
        base = self.base_layer
        return with_weight(base, out_in_weight(base).float() + self.delta_weight().float())
