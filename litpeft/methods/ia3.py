"""(IA)^3: infused adapters by inhibiting and amplifying inner activations (Liu et al. 2022, arXiv 2205.05638).

Learned vectors rescale activations elementwise (paper sec. 3.3, eq. before Fig. 1)::

    softmax(Q (l_k * K)^T / sqrt(d_k)) (l_v * V)        (l_ff * f(W_1 x)) W_2

Here, as in Hugging Face peft, a vector rescales a selected linear layer's output (``l_k``, ``l_v``: the
key and value projections, ``h = l * (W x + b)``) or, for a *feed-forward* layer, its input (``l_ff``:
the FFN's down projection, ``h = W (l * x) + b``). Every ``l`` starts at 1: the wrapped model starts
exactly at the base model. Each is a weight update: ``l * W`` scales W's rows (and the bias), ``W * l``
its columns, so :meth:`IA3.merge` folds them into the base weights. Layers hold the vector as ``ia3_l``
with peft's shapes (``out x 1``, or ``1 x in`` for a feed-forward layer), so the peft export is a rename
of the prefix.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from litpeft.errors import InvalidArgument
from litpeft.methods.base import (
    PeftLayer,
    PeftMethod,
    check_target_modules,
    find_targets,
    merge_layers,
    peft_target_names,
    replace_module,
)
from litpeft.methods.linear import in_out_features, layer_device, out_in_weight
from litpeft.quantize import plain_layer

#: keys, values and the FFN's down projection in every family of the matrix (Llama-style, GPT-2,
#: GPT-NeoX, Phi-3); a fused q/k/v projection (``c_attn``, ``query_key_value``, ``qkv_proj``) is rescaled
#: whole, queries included, as peft does for GPT-2
DEFAULT_TARGETS = [
    "k_proj",
    "v_proj",
    "down_proj",
    "c_attn",
    "mlp.c_proj",
    "query_key_value",
    "dense_4h_to_h",
    "qkv_proj",
]
DEFAULT_FEEDFORWARD = ["down_proj", "mlp.c_proj", "dense_4h_to_h"]


class IA3Linear(nn.Module, PeftLayer):
    """``l * base_layer(x)``, or ``base_layer(l * x)`` for a feed-forward layer; ``l`` is ``ia3_l``."""

    def __init__(self, base_layer: nn.Module, feedforward: bool) -> None:
        super().__init__()
        self.base_layer, self.feedforward = base_layer, feedforward
        in_features, out_features = in_out_features(base_layer)
        shape = (1, in_features) if feedforward else (out_features, 1)
        # fp32 whatever the base's dtype (master weights; the forward casts back, as peft's layer does)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=layer_device(base_layer), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x)
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        out = self.base_layer(x)
        return (out * scale).to(out.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base layer with ``l`` folded in (rows and bias, or columns): in place for a float
        ``nn.Linear`` / ``Conv1D``, else (a quantized base) a plain layer of the same kind."""
        base = self.base_layer
        scale = self.ia3_l.flatten().float()
        weight = out_in_weight(base).float()
        weight = weight * scale[None, :] if self.feedforward else weight * scale[:, None]
        bias = base.bias
        if bias is not None and not self.feedforward:
            bias = bias.float() * scale
        dtype = base.weight.dtype if base.weight.is_floating_point() else torch.float32
        if type(base) not in (nn.Linear, Conv1D) or not base.weight.is_floating_point():
            return plain_layer(base, weight.to(dtype), None if bias is None else bias.to(dtype))
        base.weight.copy_(weight.T if isinstance(base, Conv1D) else weight)
        if bias is not None:
            base.bias.copy_(bias)
        return base


class IA3(PeftMethod):
    """(IA)^3 on the selected linear layers (``nn.Linear`` and GPT-2's ``Conv1D``).

    Args:
        target_modules: layers whose output (or, for feed-forward layers, input) gets a learned vector:
            names (suffix match), a regex (full match) or ``"all-linear"``, as LoRA's. The default names
            the keys, values and FFN down projections of every supported family (a fused q/k/v projection
            is rescaled whole, as peft does).
        feedforward_modules: which of the targets are feed-forward layers (their input is rescaled);
            names (suffix match) or a regex (full match). As lists, a subset of ``target_modules`` (peft's
            rule). Default: the FFN down projections (``down_proj``, ``mlp.c_proj``, ``dense_4h_to_h``)
            among the targets.
    """

    name = "ia3"
    learning_rate = 3e-3  # configs/ia3.yaml
    mergeable = True
    exportable_to_peft = True

    def __init__(
        self,
        target_modules: str | list[str] | None = None,
        feedforward_modules: str | list[str] | None = None,
    ) -> None:
        if target_modules is not None:
            check_target_modules(target_modules)
        if isinstance(feedforward_modules, str):
            check_target_modules(feedforward_modules, "feedforward_modules")
        self.target_modules = list(target_modules) if isinstance(target_modules, tuple) else target_modules
        self.feedforward_modules = (
            list(feedforward_modules) if isinstance(feedforward_modules, tuple) else feedforward_modules
        )
        targets, feedforward = self.targets(), self.feedforward()
        if (
            isinstance(feedforward, list)
            and isinstance(targets, list)
            and not set(feedforward) <= set(targets)
        ):
            raise InvalidArgument(
                "feedforward_modules", feedforward, f"a subset of target_modules ({targets})", "method"
            )

    def targets(self) -> str | list[str]:
        """``target_modules``, or the default names."""
        return list(DEFAULT_TARGETS) if self.target_modules is None else self.target_modules

    def feedforward(self) -> str | list[str]:
        """``feedforward_modules``, or the default FFN down projections among the targets."""
        if self.feedforward_modules is not None:
            return self.feedforward_modules
        targets = self.targets()
        return [t for t in DEFAULT_FEEDFORWARD if isinstance(targets, str) or t in targets]

    def is_feedforward(self, name: str) -> bool:
        """Whether the target ``name`` is a feed-forward layer (its input is rescaled)."""
        ff = self.feedforward()
        if isinstance(ff, str):
            return re.fullmatch(ff, name) is not None
        return any(name == t or name.endswith("." + t) for t in ff)

    def inject(self, model: PreTrainedModel) -> None:
        for name in find_targets(model, self.targets(), (nn.Linear, Conv1D)):
            replace_module(model, name, IA3Linear(model.get_submodule(name), self.is_feedforward(name)))

    def merge(self, model: PreTrainedModel) -> PreTrainedModel:
        """Fold every ``l`` into its base layer and remove the (IA)^3 layers."""
        return merge_layers(model, IA3Linear)

    def to_peft(
        self, model: PreTrainedModel, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}
        adapted = sorted(k.rsplit(".ia3_l", 1)[0] for k in state if k.endswith(".ia3_l"))
        feedforward = [n for n in adapted if layers[n].feedforward]
        targets = peft_target_names(model, adapted)
        ff_short = sorted({n.rsplit(".", 1)[-1] for n in feedforward})
        # peft takes a target as feed-forward when its name merely ends with an entry (no dot), and wants
        # feedforward_modules within target_modules: short names for both, or full names for both
        short_ok = targets != adapted and all(
            any(n.endswith(s) for s in ff_short) == (n in feedforward) for n in adapted
        )
        config = {
            "peft_type": "IA3",
            "task_type": "CAUSAL_LM",
            "target_modules": targets if short_ok else adapted,
            "feedforward_modules": ff_short if short_ok else feedforward,
            "fan_in_fan_out": isinstance(layers[adapted[0]].base_layer, Conv1D),
            "init_ia3_weights": True,
            "inference_mode": True,
        }
        return config, {"base_model.model." + k: v for k, v in state.items()}
