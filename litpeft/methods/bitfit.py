"""BitFit: bias-terms fine-tuning (Ben Zaken et al. 2021, arXiv 2106.10199).

Only the model's bias terms train, every weight stays frozen (paper sec. 2, eq. 1-3: the biases
``b_q, b_k, b_v, b_o, b_m1, b_m2`` of attention and MLP, and the LayerNorm biases ``b_LN``). A trained
bias is held as a delta ``d`` (zero at init, fp32) added to the layer's output, ``W x + (b + d)``: the
model starts exactly at the base model, Adam's update of ``d`` is that of ``b`` itself, and
``adapters_disabled`` gives the base model. :meth:`BitFit.merge` adds ``d`` to ``b``.

BitFit trains biases that exist: many decoder families (Llama, Mistral, Gemma, Phi-3, OLMo 2, Qwen3,
Granite) have none and are refused with one line, unless ``add_missing_biases`` gives every selected
linear layer without a bias a zero one to train (LLaMA-Adapter v2's "bias tuning", Gao et al. 2023,
arXiv 2304.15010, sec. 3.1, without its scale). The merge then turns on the config's bias switches
(``attention_bias``, ``mlp_bias``) so that ``from_pretrained`` loads the merged biases; a family without
such a switch for a layer (e.g. Qwen2's ``o_proj``) cannot take a merged bias there and is refused with
the layer's name. Hugging Face peft has no BitFit, so there is no peft export.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from litpeft.errors import LitPeftError
from litpeft.methods.base import PeftLayer, PeftMethod, check_target_modules, find_targets, replace_module
from litpeft.methods.layout import is_norm
from litpeft.methods.linear import in_out_features, layer_device
from litpeft.methods.llama_adapter import _fit_config_to_biases
from litpeft.quantize import plain_layer


def _has_bias(module: nn.Module) -> bool:
    """A layer whose bias is added last, over the output's last dimension: linear layers and norms."""
    bias = getattr(module, "bias", None)
    return (
        isinstance(bias, nn.Parameter)
        and bias.is_floating_point()
        and (isinstance(module, (nn.Linear, Conv1D)) or is_norm(module))
    )


class BiasDelta(nn.Module, PeftLayer):
    """``base_layer(x) + bias_delta``: the layer's bias (or a new one, from 0) trained as an fp32 delta."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        if isinstance(base_layer, (nn.Linear, Conv1D)):
            out = in_out_features(base_layer)[1]
        else:  # a norm: its bias's size
            out = base_layer.bias.shape[-1]
        f = {"device": layer_device(base_layer), "dtype": torch.float32}
        self.bias_delta = nn.Parameter(torch.zeros(out, **f))

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        out = self.base_layer(*args, **kwargs)
        return out if self.disabled else out + self.bias_delta.to(out.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base layer with ``b + d`` as its bias (in the bias's dtype; a new bias: the weight's)."""
        base = self.base_layer
        if isinstance(base, nn.Linear) and type(base) is not nn.Linear:  # quantized: a plain layer
            bias = self.bias_delta if base.bias is None else base.bias.float() + self.bias_delta
            return plain_layer(base, base.weight, bias)
        if base.bias is None:
            base.bias = nn.Parameter(self.bias_delta.detach().to(base.weight.dtype), requires_grad=False)
        else:
            base.bias.copy_((base.bias.float() + self.bias_delta).to(base.bias.dtype))
        return base


class BitFit(PeftMethod):
    """BitFit: the bias terms of the linear layers and norms train, nothing else.

    Args:
        target_modules: the layers whose bias trains: names (suffix match) or a regex (full match);
            ``null``: every bias of the model (the paper's BitFit). E.g. ``[q_proj, c_attn, c_fc]``: the
            paper's smaller variant (query and first MLP biases, sec. 4).
        add_missing_biases: give each selected linear layer (``null``: every one but the LM head) that
            has no bias a zero one to train; needed on families without biases (Llama, Mistral, ...).
    """

    name = "bitfit"
    learning_rate = 1e-3  # configs/bitfit.yaml
    mergeable = True
    not_exportable_reason = (
        "method 'bitfit' has no Hugging Face peft equivalent to export to (peft has no bias-only tuner); "
        "use the adapter directory, or litpeft merge"
    )

    def __init__(
        self, target_modules: str | list[str] | None = None, add_missing_biases: bool = False
    ) -> None:
        if target_modules is not None:
            check_target_modules(target_modules)
        self.target_modules = list(target_modules) if isinstance(target_modules, tuple) else target_modules
        self.add_missing_biases = add_missing_biases

    def inject(self, model: PreTrainedModel) -> None:
        output_layer = model.get_output_embeddings()
        linear = [
            n
            for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and m is not output_layer
        ]
        names = [n for n, m in model.named_modules() if _has_bias(m)]
        if self.add_missing_biases:
            names = sorted(set(names) | set(linear), key=[n for n, _ in model.named_modules()].index)
        if self.target_modules is not None:
            kinds = tuple(
                {type(m) for m in model.modules() if isinstance(m, (nn.Linear, Conv1D)) or is_norm(m)}
            )
            selected = set(find_targets(model, self.target_modules, kinds))
            names = [n for n in names if n in selected]
        if not names:
            where = "the selected layers of " if self.target_modules is not None else ""
            raise LitPeftError(
                f"bitfit: no bias terms to train in {where}{type(model).__name__} (BitFit trains existing "
                "biases; Llama-style families have none): set add_missing_biases: true to train new ones"
            )
        for name in names:
            replace_module(model, name, BiasDelta(model.get_submodule(name)))

    def merge(self, model: PreTrainedModel) -> PreTrainedModel:
        """Add each trained delta to its base bias (or make it the new bias); remove the BitFit layers."""
        for name, module in list(model.named_modules()):
            if isinstance(module, BiasDelta):
                replace_module(model, name, module.merged())
        try:
            _fit_config_to_biases(model)  # new biases: the config's bias switches, where it has them
        except LitPeftError as e:
            raise LitPeftError(f"bitfit merge: {str(e).split(': ', 1)[1]}") from None
        model.requires_grad_(False)
        return model
