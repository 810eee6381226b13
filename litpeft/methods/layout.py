"""Where things are in a Hugging Face causal LM, and the one way a method hangs its state on it.

Methods find what they change without per-model code:

- :func:`decoder_layers`: the repeated decoder layers (the ``nn.ModuleList`` of the backbone with
  ``num_hidden_layers`` entries); FSDP shards each one (:mod:`litpeft.distributed`) and the bottleneck
  adapters hook each one.
- :func:`find_block`: the attention or MLP child of a layer, by the attribute names transformers uses or
  by class name (``*Attention``, ``*MLP``).
- :func:`attention_modules`, :func:`head_dim`, :func:`kv_heads`, :func:`text_config`, :func:`hidden_size`,
  :func:`max_positions`, :func:`decoder_backbone`, :func:`is_norm`.

State a method keeps in the model is a child module under a fixed *slot* name, set with :func:`attach`
and read with :func:`attached` (its parameters are then named ``<module>.<slot>.<param>``: the slot
names are part of the saved adapter format and of the peft export mapping, never rename one). Wrapping a
layer (LoRA, bias/scale, :class:`TrainableNorm`) is :func:`litpeft.methods.base.replace_module`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from litpeft.errors import LitPeftError
from litpeft.methods.base import PeftLayer, replace_module

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "ff")
#: kind -> (attribute names transformers uses, class-name suffix)
BLOCKS = {"attention": (ATTENTION_NAMES, "Attention"), "mlp": (MLP_NAMES, "MLP")}


# -- attaching method state ----------------------------------------------------------------------------
def attach(module: nn.Module, slot: str, layer: nn.Module) -> nn.Module:
    """Hang ``layer`` on ``module`` as its child ``slot`` (registered: it moves, saves and trains with it)."""
    if slot in module._modules:
        raise LitPeftError(f"{type(module).__name__} already has a '{slot}' (a method was applied twice?)")
    module.add_module(slot, layer)
    return layer


def attached(module: nn.Module, slot: str) -> Any:
    """The layer :func:`attach` hung on ``module`` under ``slot``, or ``None``."""
    return module._modules.get(slot)


def detach(module: nn.Module, slot: str) -> nn.Module | None:
    """Remove and return the layer under ``slot`` (``None`` if there is none)."""
    return module._modules.pop(slot, None)


# -- config --------------------------------------------------------------------------------------------
def text_config(model: PreTrainedModel) -> PretrainedConfig:
    """The config of the language model (a multimodal config's text part)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def hidden_size(model: PreTrainedModel) -> int:
    """Width of the token embeddings (the residual stream)."""
    return model.get_input_embeddings().weight.shape[1]


def max_positions(model: PreTrainedModel) -> int:
    """The context length (``max_position_embeddings``); unbounded when the config has none."""
    return getattr(text_config(model), "max_position_embeddings", None) or 1 << 62


def kv_heads(model: PreTrainedModel) -> int:
    """Number of key/value heads (grouped-query attention), else of attention heads."""
    config = text_config(model)
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


# -- modules -------------------------------------------------------------------------------------------
def require_decoder_only(model: PreTrainedModel, method: str) -> None:
    """Refuse an encoder-decoder model."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise LitPeftError(
            f"{method} supports decoder-only causal LMs; {type(model).__name__} is an encoder-decoder model"
        )


def decoder_backbone(model: PreTrainedModel, method: str) -> nn.Module:
    """The decoder without the LM head (``model.base_model``), or a clear refusal."""
    require_decoder_only(model, method)
    backbone = model.base_model
    if backbone is model or not hasattr(backbone, "get_input_embeddings"):
        raise LitPeftError(f"{method}: {type(model).__name__} has no separate decoder backbone (base_model)")
    return backbone


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers: the first ``nn.ModuleList`` under the backbone with ``num_hidden_layers`` entries.

    The one rule for everything that works per layer: FSDP shards each entry, the bottleneck adapters hook
    each one. (A multimodal model's vision blocks have another count and are not returned.)
    """
    config = text_config(model)
    n = getattr(config, "num_hidden_layers", None)
    for m in getattr(model, "base_model", model).modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise LitPeftError(
        f"found no list of {n} decoder layers (num_hidden_layers) in {type(model).__name__}; "
        "this architecture is not supported"
    )


def find_block(
    layer: nn.Module,
    kind: Literal["attention", "mlp"],
    override: str | None = None,
    option: str = "",
    method: str = "HoulsbyAdapter",
) -> str:
    """Name of the attention or MLP child of ``layer``: ``override``, a known name, or a unique class-name match."""
    names, suffix = BLOCKS[kind]
    option = option or f"{kind}_module"
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
            f"{method}: cannot tell which child of {type(layer).__name__} is the {suffix} block "
            f"(children: {', '.join(children)}); set {option}"
        )
    return matches[0]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules, in layer order (``*Attention`` modules with an integer ``layer_idx``)."""
    mods = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int)
        and type(m).__name__.endswith("Attention")
        and not getattr(m, "is_cross_attention", False)
    ]
    mods.sort(key=lambda m: m.layer_idx)
    return mods


def head_dim(module: nn.Module) -> int:
    """Width of one attention head of an attention module: its ``head_dim``, else the config's, else
    ``hidden_size / num_attention_heads`` (GPT-NeoX's attention has neither attribute, only ``head_size``)."""
    dim = getattr(module, "head_dim", None)
    if isinstance(dim, int):
        return dim
    config = module.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm or RMSNorm (torch's, or a model's own ``*LayerNorm`` / ``*RMSNorm`` class)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(
        ("RMSNorm", "LayerNorm")
    )


class TrainableNorm(nn.Module, PeftLayer):
    """A normalization layer trained with the method (Houlsby et al. 2019, sec. 2.1; LLaMA-Adapter V2,
    Gao et al. 2023, sec. 3.1).

    The norm is trained as the child ``slot`` (its saved keys: ``<norm>.<slot>.weight``; the bottleneck
    adapters use ``base_layer``, LLaMA-Adapter V2 ``tuned``), with its parameters in fp32 whatever the
    base's dtype: under ``bf16-true`` a bf16 norm weight near 1 moves only in steps of 2^-8, so a small
    Adam step would never change it. Its output has the dtype the base norm's would have (the input's and
    the base's promoted: under ``bf16-true``, bf16), and while the trained values equal the base values
    it is the base norm's output bit for bit (the norm computes in fp32 and rounds once, either way).
    The base values are kept as non-persistent buffers in their own dtype, so that ``adapters_disabled``
    computes with them and gives the base model.
    """

    def __init__(self, norm: nn.Module, slot: str = "base_layer") -> None:
        super().__init__()
        self.slot = slot
        self.add_module(slot, norm)
        self._names = [n for n, _ in norm.named_parameters()]
        for n, p in norm.named_parameters():
            self.register_buffer("base_" + n.replace(".", "_"), p.detach().clone(), persistent=False)
            if p.is_floating_point():
                p.data = p.data.float()  # the trained copy: fp32 master weights
        norm.requires_grad_(True)

    @property
    def base_dtype(self) -> torch.dtype | None:
        """The dtype of the base values (they follow the model's casts; the trained copy keeps fp32)."""
        return next((b.dtype for b in self.buffers(recurse=False) if b.is_floating_point()), None)

    @property
    def trained(self) -> nn.Module:
        """The trained norm (a plain layer of the model's own class, fp32 parameters)."""
        return self._modules[self.slot]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled:
            params = {n: getattr(self, "base_" + n.replace(".", "_")) for n in self._names}
            return torch.func.functional_call(self.trained, params, args, kwargs)
        out = self.trained(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)) or self.base_dtype is None:
            return out
        dtype = torch.promote_types(x.dtype, self.base_dtype)
        return out if out.dtype == dtype or not out.is_floating_point() else out.to(dtype)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The trained norm with its parameters in the base's dtype: a plain layer for a merged model."""
        norm = self.trained
        if self.base_dtype is not None:
            for p in norm.parameters():
                if p.is_floating_point():
                    p.data = p.data.to(self.base_dtype)
        return norm


def train_norms(parent: nn.Module, slot: str, children_only: bool = False) -> None:
    """Wrap every norm in ``parent`` (or only its direct children) in a :class:`TrainableNorm`."""
    found = parent.named_children() if children_only else parent.named_modules()
    for name in [n for n, m in found if is_norm(m)]:
        replace_module(parent, name, TrainableNorm(parent.get_submodule(name), slot))
