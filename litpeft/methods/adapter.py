"""Bottleneck adapters (Houlsby et al. 2019, arXiv 1902.00751), with the Pfeiffer placement as an option.

An adapter maps the output ``h`` of a sub-layer (attention or feed-forward, after its projection back to the
model width and before the residual addition) through a bottleneck with a skip connection (paper Fig. 2)::

    h' = h + W_up f(W_down h + b_down) + b_up,      W_down: m x d,  W_up: d x m,  m << d

Houlsby places one after the attention block and one after the MLP of every layer and also trains the layer
norms; Pfeiffer et al. (2021, arXiv 2005.00247) keep only the one after the MLP. Initialised near identity:
the paper's truncated normal with a small std (the reference code, google-research/adapter-bert, uses 1e-3)
for both projections and zero biases, or ``zero_up`` (``W_up = 0``: exactly the base model at step 0).

The sub-layers are found without per-model code: the decoder layer list is the ``nn.ModuleList`` of the
backbone with ``num_hidden_layers`` entries, and in each layer the attention / MLP child is found by the
attribute names transformers uses (``self_attn``, ``attn``, ...; ``mlp``, ...) or by class name
(``*Attention``, ``*MLP``). Forward hooks add the adapters, so the attention and MLP modules keep their names;
trained layer norms are wrapped (``<norm>.base_layer``) so that disabling the method restores their base
values. The activation makes adapters nonlinear: they cannot be merged into the base weights, and
Hugging Face peft has no bottleneck adapters (peft issue #244), so there is no peft export.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from litpeft.errors import LitPeftError
from litpeft.methods.base import PeftLayer, PeftMethod

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "ff")
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


class TrainedNorm(nn.Module, PeftLayer):
    """A layer norm trained along with the adapters (paper section 2.1); disabled, it computes with the
    base model's parameters, kept as a copy, so that ``adapters_disabled`` still gives the base model."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._names = [n for n, _ in base_layer.named_parameters()]
        for n, p in base_layer.named_parameters():
            self.register_buffer("base_" + n.replace(".", "_"), p.detach().clone(), persistent=False)
        base_layer.requires_grad_(True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled:
            params = {n: getattr(self, "base_" + n.replace(".", "_")) for n in self._names}
            return torch.func.functional_call(self.base_layer, params, args, kwargs)
        return self.base_layer(*args, **kwargs)


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The backbone's list of decoder layers: the ``nn.ModuleList`` with ``num_hidden_layers`` entries."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(config, "num_hidden_layers", None)
    candidates = [m for m in model.base_model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not candidates:
        raise LitPeftError(
            f"HoulsbyAdapter: found no list of {n} decoder layers in {type(model).__name__}; "
            "this architecture is not supported"
        )
    return candidates[0]


def find_block(
    layer: nn.Module, names: tuple[str, ...], suffix: str, option: str, override: str | None
) -> str:
    """Name of the attention or MLP child of ``layer``: ``override``, a known name, or a unique class-name match."""
    children = dict(layer.named_children())
    if override is not None:
        if override not in children:
            raise LitPeftError(
                f"{option}={override!r} is not a child of {type(layer).__name__} (children: {', '.join(children)})"
            )
        return override
    for name in names:
        if name in children:
            return name
    matches = [n for n, m in children.items() if type(m).__name__.endswith(suffix)]
    if len(matches) != 1:
        raise LitPeftError(
            f"HoulsbyAdapter: cannot tell which child of {type(layer).__name__} is the {suffix} block "
            f"(children: {', '.join(children)}); set {option}"
        )
    return matches[0]


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
            if value is not None and value <= 0:
                raise LitPeftError(f"{option} must be positive, got {value}")
        if activation not in ACTIVATIONS:
            raise LitPeftError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if init not in ("normal", "zero_up"):
            raise LitPeftError(f"init must be normal or zero_up, got {init!r}")
        if placement not in ("houlsby", "pfeiffer"):
            raise LitPeftError(f"placement must be houlsby or pfeiffer, got {placement!r}")
        self.bottleneck_size, self.reduction_factor = bottleneck_size, reduction_factor
        self.activation, self.init, self.init_std = activation, init, init_std
        self.placement, self.train_layer_norms = placement, train_layer_norms
        self.attention_module, self.mlp_module = attention_module, mlp_module

    def inject(self, model: PreTrainedModel) -> None:
        if getattr(model.config, "is_encoder_decoder", False):
            raise LitPeftError(f"HoulsbyAdapter supports decoder-only causal LMs, not {type(model).__name__}")
        hidden = model.get_input_embeddings().weight.shape[1]
        dtype = model.get_input_embeddings().weight.dtype  # a quantized block's weights are integers
        m = self.bottleneck_size or hidden // int(self.reduction_factor or 1)
        if m <= 0:
            raise LitPeftError(
                f"reduction_factor={self.reduction_factor} leaves no bottleneck for width {hidden}"
            )
        for layer in decoder_layers(model):
            blocks = [("adapter_mlp", find_block(layer, MLP_NAMES, "MLP", "mlp_module", self.mlp_module))]
            if self.placement == "houlsby":
                attn = find_block(
                    layer, ATTENTION_NAMES, "Attention", "attention_module", self.attention_module
                )
                blocks.insert(0, ("adapter_attn", attn))
            for adapter_name, block_name in blocks:
                block = layer.get_submodule(block_name)
                device = next(block.parameters()).device
                adapter = BottleneckAdapter(
                    hidden, m, self.activation, self.init, self.init_std, device, dtype
                )
                layer.add_module(adapter_name, adapter)
                block.register_forward_hook(adapter.hook)
            if self.train_layer_norms:
                for name, child in list(layer.named_children()):
                    if "Norm" in type(child).__name__:
                        setattr(layer, name, TrainedNorm(child))

    def merge(self, model: PreTrainedModel) -> PreTrainedModel:
        raise LitPeftError(
            "Houlsby/Pfeiffer adapters cannot be merged into the base weights: the bottleneck has a "
            "nonlinearity, so it is no linear map to fold in; keep the adapter directory"
        )

    def to_peft(
        self, model: PreTrainedModel, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        raise LitPeftError(
            "Houlsby/Pfeiffer adapters have no Hugging Face peft equivalent (peft has no bottleneck "
            "adapters, peft issue #244); use the litpeft adapter directory"
        )
