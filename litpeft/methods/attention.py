"""One attention function for every method that works inside attention.

transformers routes attention through ``AttentionInterface``: each attention module computes q/k/v
(after RoPE and after the KV cache update) and calls the function registered under
``config._attn_implementation``. litpeft registers :func:`peft_attention` under ``litpeft_sdpa`` and
``litpeft_eager``; it wraps the model's own implementation (sdpa or eager) and applies the state that
methods attached to the attention module (:func:`litpeft.methods.layout.attach`) in the *attention
slots* registered here (:func:`register_attention_slot`), each an :class:`AttentionState`:

- ``litpeft_prefix`` (:class:`litpeft.methods.prefix.PrefixKV`): per-layer prefix keys/values (prefix
  tuning, P-tuning v2), prepended to the layer's keys/values before attention (never in the KV cache).
- ``litpeft_adaption`` (:class:`litpeft.methods.llama_adapter.AdaptionPrompt`): LLaMA-Adapter's gated
  adaption-prompt attention (Zhang et al. 2023, arXiv 2303.16199, eq. 8), added to the attention output
  before the output projection.

It also registers ``litpeft_cpu_sdpa`` (:func:`cpu_sdpa_attention`), transformers' sdpa computed in fp32 on
the CPU under bf16, which PeftLM uses for every model on sdpa and :func:`peft_attention` wraps in place of
plain sdpa.

The function itself knows no method. Any architecture whose attention calls the interface is supported
(Llama, Mistral, Qwen2/3, Phi3, GPT-2, ...); :func:`use_peft_attention` refuses the others with a clear error.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    eager_mask,
    sdpa_mask,
)

from litpeft.errors import LitPeftError
from litpeft.methods.base import PeftLayer
from litpeft.methods.layout import attached

#: registered name -> the implementation it wraps
WRAPPED = {"litpeft_sdpa": "sdpa", "litpeft_eager": "eager"}
CPU_SDPA = "litpeft_cpu_sdpa"


@dataclass
class AttentionCall:
    """One call of the attention interface, as transformers makes it: the attention ``module``, query
    ``(B, H, q, d)``, key/value ``(B, H_kv, kv, d)`` (after RoPE and the KV cache), the ``mask`` (sdpa's
    bool, eager's additive, or None: plain causal) and the keyword arguments (``scaling``,
    ``position_ids``, ``sliding_window``, ``softcap``, ...)."""

    module: nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    kwargs: dict[str, Any]


def interface_function(
    fn: Callable[[AttentionCall], tuple[torch.Tensor, Any]],
) -> Callable[..., tuple[torch.Tensor, Any]]:
    """``fn(call)`` as a function of transformers' ``AttentionInterface`` (its positional signature)."""

    @functools.wraps(fn)
    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        return fn(AttentionCall(module, query, key, value, attention_mask, kwargs))

    return attention


class AttentionState(nn.Module, PeftLayer):
    """Per-layer state a method keeps in an attention slot; :func:`peft_attention` calls both steps.

    Shapes as :class:`AttentionCall`'s; the output is ``(B, q, H, d)``. The defaults change nothing.
    """

    def keys_values(self, call: AttentionCall) -> AttentionCall:
        """Before attention: the call with the keys, values and mask to attend over."""
        return call

    def output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        """After attention: the output, before the output projection."""
        return out


#: slot name (the attribute of the attention module, part of the saved keys) -> its state class
ATTENTION_SLOTS: dict[str, type[AttentionState]] = {}


def register_attention_slot(slot: str, cls: type[AttentionState]) -> None:
    """Make :func:`peft_attention` apply the :class:`AttentionState` a method attaches under ``slot``."""
    if ATTENTION_SLOTS.get(slot, cls) is not cls:
        raise LitPeftError(f"attention slot '{slot}' is already taken by {ATTENTION_SLOTS[slot].__name__}")
    ATTENTION_SLOTS[slot] = cls


@interface_function
def cpu_sdpa_attention(call: AttentionCall) -> tuple[torch.Tensor, Any]:
    """transformers' SDPA attention, computed in float32 on the CPU under bf16/fp16.

    PyTorch's CPU flash-attention kernel is about 3x slower in bf16 than in fp32 on short sequences
    (forward + backward of 8 x 79 tokens, 9 heads: 37 vs 13 ms) and no faster on long ones (512 tokens:
    241 vs 248 ms), so on the CPU the attention product runs in fp32 with autocast off, whether the
    inputs are bf16 (``bf16-true``) or arrive as fp32 under autocast (``bf16-mixed``: RoPE's fp32 cos/sin
    promote the bf16 projections, and autocast would cast them back down for the kernel). The output has
    the dtype the model's own sdpa would give: the autocast dtype under autocast, else the query's.
    Anywhere else this is transformers' own ``sdpa``.
    """
    module, query, mask = call.module, call.query, call.mask
    autocast = query.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    if query.device.type != "cpu" or not (autocast or query.dtype in (torch.bfloat16, torch.float16)):
        return sdpa_attention_forward(module, query, call.key, call.value, mask, **call.kwargs)
    out_dtype = torch.get_autocast_dtype("cpu") if autocast else query.dtype
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), call.key.float(), call.value.float(), mask, **call.kwargs
        )
    return out.to(out_dtype), weights


def _wrapped_implementation(module: nn.Module) -> Callable[..., tuple[torch.Tensor, Any]]:
    name = WRAPPED[module.config._attn_implementation]
    if name == "sdpa":
        return cpu_sdpa_attention
    # The model's own eager function lives in its modeling file (GPT-2 and Llama differ in details).
    return sys.modules[type(module).__module__].eager_attention_forward


@interface_function
def peft_attention(call: AttentionCall) -> tuple[torch.Tensor, Any]:
    """The wrapped attention plus what the module carries in the registered slots (prefix K/V, prompts).

    Shapes as :class:`AttentionCall`'s; returns ``(B, q, H, d)`` and the attention weights (or None).
    """
    states = [
        s for slot in ATTENTION_SLOTS if (s := attached(call.module, slot)) is not None and not s.disabled
    ]
    for state in states:
        call = state.keys_values(call)
    implementation = _wrapped_implementation(call.module)
    out, weights = implementation(call.module, call.query, call.key, call.value, call.mask, **call.kwargs)
    for state in states:
        out = state.output(call, out)
    return out, weights


def _register() -> None:
    for name, base in WRAPPED.items():
        AttentionInterface.register(name, peft_attention)
        AttentionMaskInterface.register(name, sdpa_mask if base == "sdpa" else eager_mask)
    AttentionInterface.register(CPU_SDPA, cpu_sdpa_attention)
    AttentionMaskInterface.register(CPU_SDPA, sdpa_mask)
    assert "litpeft_sdpa" in ALL_MASK_ATTENTION_FUNCTIONS


_register()


def use_peft_attention(model: PreTrainedModel, option: str = "method") -> None:
    """Switch ``model`` to :func:`peft_attention` wrapping its current implementation (sdpa or eager)."""
    current = model.config._attn_implementation
    if current in WRAPPED:
        return
    if not getattr(model, "_supports_attention_backend", False):
        raise LitPeftError(
            f"{option}: {type(model).__name__} does not use transformers' attention interface, which this "
            "method needs (supported: Llama, Mistral, Qwen2/3, Phi3, GPT-2 and others that use it)"
        )
    if current not in ("sdpa", "eager"):
        raise LitPeftError(
            f"{option}: attention implementation '{current}' is not supported; load the model with 'sdpa' or "
            "'eager'"
        )
    model.set_attn_implementation(f"litpeft_{current}")


def restore_attention(model: PreTrainedModel) -> None:
    """Switch ``model`` back to the implementation :func:`use_peft_attention` wrapped."""
    current = model.config._attn_implementation
    if current in WRAPPED:
        model.set_attn_implementation(WRAPPED[current])
