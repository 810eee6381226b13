"""Bottleneck adapters (Houlsby et al. 2019, arXiv 1902.00751), with the Pfeiffer placement as an option.

An adapter maps the output ``h`` of a sub-layer (attention or feed-forward, after its projection back to the
model width and before the residual addition) through a bottleneck with a skip connection (paper Fig. 2)::

    h' = h + W_up f(W_down h + b_down) + b_up,      W_down: m x d,  W_up: d x m,  m << d

Houlsby places one after the attention block and one after the MLP of every layer and also trains the layer
norms; Pfeiffer et al. (2021, arXiv 2005.00247) keep only the one after the MLP. Initialised near identity:
the paper's truncated normal with a small std (the reference code, google-research/adapter-bert, uses 1e-3)
for both projections and zero biases, or ``zero_up`` (``W_up = 0``: exactly the base model at step 0).

The sub-layers are found without per-model code (:mod:`litpeft.methods.layout`: the decoder layers, and in
each the attention / MLP child). The adapters are attached to the layer as ``adapter_attn`` /
``adapter_mlp`` and applied by forward hooks on the blocks, so the attention and MLP modules keep their
names; trained layer norms are wrapped (``<norm>.base_layer``, :class:`~litpeft.methods.layout.TrainableNorm`)
so that disabling the method restores their base values. The activation makes adapters nonlinear: they
cannot be merged into the base weights, and Hugging Face peft has no bottleneck adapters (peft issue #244),
so there is no peft export (both declared on :class:`HoulsbyAdapter`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from litpeft.errors import LitPeftError
from litpeft.methods.base import PeftLayer, PeftMethod, check_arg
from litpeft.methods.layout import (
    attach,
    decoder_layers,
    find_block,
    hidden_size,
    require_decoder_only,
    train_norms,
)

ACTIVATIONS = ("gelu", "relu", "silu", "tanh", "gelu_new")


class BottleneckAdapter(nn.Module, PeftLayer):
    """``h + up(f(down(h)))`` (Houlsby et al. 2019, Fig. 2)."""

    def __init__(
        self,
        hidden: int,
        bottleneck: int,
        activation: str,
        init: str,
        init_std: float,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.down = nn.Linear(hidden, bottleneck, **f)
        self.up = nn.Linear(bottleneck, hidden, **f)
        self.act = ACT2FN[activation]
        with torch.no_grad():
            if init == "normal":
                for p in (self.down.weight, self.up.weight):
                    nn.init.trunc_normal_(p, std=init_std, a=-2 * init_std, b=2 * init_std)
            else:  # zero_up: down keeps nn.Linear's default (kaiming uniform) so the up gradient is not zero
                nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return h
        w = self.down.weight
        return h + self.up(self.act(self.down(h.to(w.dtype)))).to(h.dtype)

    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook on the attention/MLP block: adapt its output (the first element of a tuple)."""
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        return self(output)


class HoulsbyAdapter(PeftMethod):
    """Bottleneck adapters after the attention and MLP blocks of every decoder layer.

    Args:
        bottleneck_size: adapter width ``m``.
        reduction_factor: alternatively ``m = hidden_size // reduction_factor`` (set one of the two).
        activation: the nonlinearity ``f``: gelu (as the reference code), relu, silu, tanh, gelu_new.
        init: ``normal``: truncated normal with ``init_std`` for both projections (paper, section 2.1);
            ``zero_up``: up-projection zero, so the model starts exactly at the base model.
        init_std: std of the ``normal`` init (the reference code's 1e-3).
        placement: ``houlsby`` (after attention and after the MLP) or ``pfeiffer`` (after the MLP only).
        train_layer_norms: also train the norms of each decoder layer, as the paper does.
        attention_module: name of the attention child of a decoder layer, when it cannot be found.
        mlp_module: name of the MLP child of a decoder layer, when it cannot be found.
    """

    name = "houlsby"
    learning_rate = 5e-4  # configs/adapter.yaml
    not_mergeable_reason = (
        "Houlsby/Pfeiffer adapters cannot be merged into the base weights: the bottleneck has a "
        "nonlinearity, so it is no linear map to fold in; keep the adapter directory"
    )
    not_exportable_reason = (
        "Houlsby/Pfeiffer adapters have no Hugging Face peft equivalent (peft has no bottleneck "
        "adapters, peft issue #244); use the litpeft adapter directory"
    )

    def __init__(
        self,
        bottleneck_size: int | None = 64,
        reduction_factor: int | None = None,
        activation: Literal["gelu", "relu", "silu", "tanh", "gelu_new"] = "gelu",
        init: Literal["normal", "zero_up"] = "normal",
        init_std: float = 1e-3,
        placement: Literal["houlsby", "pfeiffer"] = "houlsby",
        train_layer_norms: bool = True,
        attention_module: str | None = None,
        mlp_module: str | None = None,
    ) -> None:
        if (bottleneck_size is None) == (reduction_factor is None):
            raise LitPeftError(
                "set exactly one of bottleneck_size and reduction_factor "
                f"(got bottleneck_size={bottleneck_size}, reduction_factor={reduction_factor})"
            )
        for option, value in (("bottleneck_size", bottleneck_size), ("reduction_factor", reduction_factor)):
            check_arg(value is None or value > 0, option, value, "a positive integer")
        check_arg(activation in ACTIVATIONS, "activation", activation, f"one of: {', '.join(ACTIVATIONS)}")
        check_arg(init in ("normal", "zero_up"), "init", init, "one of: normal, zero_up")
        check_arg(placement in ("houlsby", "pfeiffer"), "placement", placement, "one of: houlsby, pfeiffer")
        self.bottleneck_size, self.reduction_factor = bottleneck_size, reduction_factor
        self.activation, self.init, self.init_std = activation, init, init_std
        self.placement, self.train_layer_norms = placement, train_layer_norms
        self.attention_module, self.mlp_module = attention_module, mlp_module

    def inject(self, model: PreTrainedModel) -> None:
        require_decoder_only(model, "HoulsbyAdapter")
        hidden = hidden_size(model)
        # fp32 whatever the base's dtype (the adapter's master weights; the forward casts at its edges)
        dtype = torch.float32
        m = self.bottleneck_size or hidden // int(self.reduction_factor or 1)
        if m <= 0:
            raise LitPeftError(
                f"reduction_factor={self.reduction_factor} leaves no bottleneck for width {hidden}"
            )
        for layer in decoder_layers(model):
            blocks = [("adapter_mlp", find_block(layer, "mlp", self.mlp_module))]
            if self.placement == "houlsby":
                blocks.insert(0, ("adapter_attn", find_block(layer, "attention", self.attention_module)))
            for adapter_name, block_name in blocks:
                block = layer.get_submodule(block_name)
                device = next(block.parameters()).device
                adapter = BottleneckAdapter(
                    hidden, m, self.activation, self.init, self.init_std, device, dtype
                )
                block.register_forward_hook(attach(layer, adapter_name, adapter).hook)
            if self.train_layer_norms:
                train_norms(layer, slot="base_layer", children_only=True)
