"""One attention function for every method that works inside attention.

transformers routes attention through ``AttentionInterface``: each attention module computes q/k/v
(after RoPE and after the KV cache update) and calls the function registered under
``config._attn_implementation``. litpeft registers :func:`peft_attention` under ``litpeft_sdpa`` and
``litpeft_eager``; it wraps the model's own implementation (sdpa or eager) and adds, where an attention
module carries them:

- ``module.litpeft_prefix`` (:class:`PrefixKV`): per-layer prefix keys/values (prefix tuning, P-tuning
  v2). They are prepended to the layer's keys/values, never enter the KV cache, and the mask is extended
  so that every query (padding or not) sees the whole prefix. Prefix K/V have ``num_key_value_heads``
  heads, so grouped-query attention needs nothing special: the wrapped implementation repeats them as it
  repeats the layer's own keys.
- ``module.litpeft_adaption`` (:class:`AdaptionPrompt`): LLaMA-Adapter's gated adaption-prompt attention
  (Zhang et al. 2023, arXiv 2303.16199, eq. 8): a separate softmax over the prompt keys, scaled per head by
  ``tanh(gate)``, added to the attention output before the output projection.

It also registers ``litpeft_cpu_sdpa`` (:func:`cpu_sdpa_attention`), transformers' sdpa computed in fp32 on
the CPU under bf16, which PeftLM uses for every model on sdpa and :func:`peft_attention` wraps in place of
plain sdpa.

Methods attach this per-layer state; the function itself knows no method. Any architecture whose attention
calls the interface is supported (Llama, Mistral, Qwen2/3, Phi3, GPT-2, ...); :func:`use_peft_attention`
refuses the others with a clear error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from litpeft.errors import LitPeftError
from litpeft.methods.base import Dropout, PeftLayer

#: registered name -> the implementation it wraps
WRAPPED = {"litpeft_sdpa": "sdpa", "litpeft_eager": "eager"}
CPU_SDPA = "litpeft_cpu_sdpa"


def cpu_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """transformers' SDPA attention, computed in float32 on the CPU under bf16/fp16.

    PyTorch's CPU flash-attention kernel is about 3x slower in bf16 than in fp32 on short sequences
    (forward + backward of 8 x 79 tokens, 9 heads: 37 vs 13 ms) and no faster on long ones (512 tokens:
    241 vs 248 ms), so on the CPU the attention product runs in fp32 with autocast off, whether the
    inputs are bf16 (``bf16-true``) or arrive as fp32 under autocast (``bf16-mixed``: RoPE's fp32 cos/sin
    promote the bf16 projections, and autocast would cast them back down for the kernel). The output has
    the dtype the model's own sdpa would give: the autocast dtype under autocast, else the query's.
    Anywhere else this is transformers' own ``sdpa``.
    """
    autocast = query.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    if query.device.type != "cpu" or not (autocast or query.dtype in (torch.bfloat16, torch.float16)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out_dtype = torch.get_autocast_dtype("cpu") if autocast else query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return out.to(out_dtype), weights


class PrefixKV(nn.Module, PeftLayer):
    """Prefix keys and values of one layer, each ``(num_kv_heads, N, head_dim)``.

    The tensors come from ``source(layer_idx)`` (a shared reparameterization, prefix tuning) or are this
    module's own parameters ``key``/``value`` (P-tuning v2, or prefix tuning after the MLP is dropped).
    """

    def __init__(
        self,
        layer_idx: int,
        num_kv_heads: int,
        num_tokens: int,
        head_dim: int,
        source: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.layer_idx, self.num_tokens = layer_idx, num_tokens
        self.source = source
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_parameter("key", None)
        self.register_parameter("value", None)
        if source is None:
            self.key = nn.Parameter(torch.randn(num_kv_heads, num_tokens, head_dim))
            self.value = nn.Parameter(torch.randn(num_kv_heads, num_tokens, head_dim))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.source(self.layer_idx) if self.source is not None else (self.key, self.value)
        return self.dropout(k), self.dropout(v)


class AdaptionPrompt(nn.Module, PeftLayer):
    """LLaMA-Adapter's adaption prompt of one layer: ``K`` prompt vectors and a zero-init gate.

    The prompt's keys/values come from the layer's own (frozen) key/value projections, without rotary
    encoding (paper sec. 3.2). ``gate`` has one entry per head (``per_head=True``, the paper's choice) or
    one for the layer (peft's ``adaption_prompt``); it enters as ``tanh(gate)``.

    Outside autograd (generation), the prompt keys/values are computed once and reused for every token
    until a tensor they depend on changes.
    """

    def __init__(self, hidden_size: int, num_tokens: int, num_heads: int, per_head: bool = True) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(num_tokens, hidden_size))
        self.gate = nn.Parameter(torch.zeros(num_heads if per_head else 1))
        self._cached: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def key_value(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(num_kv_heads, K, head_dim)`` keys and values of the prompt through ``module``'s projections."""
        if torch.is_grad_enabled():
            self._cached = None
            return prompt_key_value(module, self.prompt)
        deps = [self.prompt, *module.parameters()]
        stamp = tuple((p.data_ptr(), p._version, p.dtype) for p in deps) + (
            torch.is_autocast_enabled(self.prompt.device.type),
        )
        if self._cached is None or self._cached[0] != stamp:
            self._cached = (stamp, prompt_key_value(module, self.prompt))
        return self._cached[1]


def prompt_key_value(module: nn.Module, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of ``prompt`` (``K x hidden``) by the attention module's own projections, no RoPE.

    Knows the three layouts of the interface's architectures: separate ``k_proj``/``v_proj`` (Llama,
    Mistral, Qwen2/3, Gemma; Qwen3's ``k_norm`` applied), fused ``c_attn`` (GPT-2) and fused
    ``qkv_proj`` (Phi3).
    """
    head_dim = module.head_dim
    x = prompt[None]
    if hasattr(module, "k_proj") and hasattr(module, "v_proj"):
        k, v = module.k_proj(x), module.v_proj(x)
    elif hasattr(module, "c_attn") and hasattr(module, "split_size"):  # GPT-2
        _, k, v = module.c_attn(x).split(module.split_size, dim=2)
    elif hasattr(module, "qkv_proj"):  # Phi3: [q | k | v] with q of num_heads * head_dim
        qkv = module.qkv_proj(x)
        q_size = module.config.num_attention_heads * head_dim
        kv_size = (qkv.shape[-1] - q_size) // 2
        k, v = qkv[..., q_size : q_size + kv_size], qkv[..., q_size + kv_size :]
    else:
        raise LitPeftError(
            f"LLaMA-Adapter does not know the key/value projections of {type(module).__name__} "
            "(supported: k_proj/v_proj, c_attn, qkv_proj)"
        )
    k = k.view(k.shape[1], -1, head_dim).transpose(0, 1)
    v = v.view(v.shape[1], -1, head_dim).transpose(0, 1)
    if hasattr(module, "k_norm"):  # Qwen3-style per-head norm on keys, part of the layer's key map
        k = module.k_norm(k)
    return k, v


def _wrapped_implementation(module: nn.Module) -> Callable[..., tuple[torch.Tensor, Any]]:
    name = WRAPPED[module.config._attn_implementation]
    if name == "sdpa":
        return cpu_sdpa_attention
    # The model's own eager function lives in its modeling file (GPT-2 and Llama differ in details).
    return sys.modules[type(module).__module__].eager_attention_forward


def _extend_mask(
    mask: torch.Tensor | None, num_prefix: int, q_len: int, kv_len: int, like: torch.Tensor
) -> torch.Tensor | None:
    """Prepend ``num_prefix`` always-visible key columns to an sdpa (bool) or eager (additive) mask."""
    if mask is None:
        if q_len == 1:
            return None  # one query sees every key, prefix included
        # None meant "plain causal" (sdpa's is_causal, aligned to the last key): materialize it.
        i = torch.arange(q_len, device=like.device)[:, None]
        j = torch.arange(kv_len, device=like.device)[None, :]
        mask = (j <= i + (kv_len - q_len))[None, None]
    if mask.dtype == torch.bool:
        pad = torch.ones(*mask.shape[:-1], num_prefix, dtype=torch.bool, device=mask.device)
    else:
        pad = torch.zeros(*mask.shape[:-1], num_prefix, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def peft_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """The wrapped attention plus the module's prefix K/V and gated adaption prompt (if any).

    Shapes as the interface defines them: query ``(B, H, q, d)``, key/value ``(B, H_kv, kv, d)``;
    returns ``(B, q, H, d)`` and the attention weights (or None).
    """
    attend = _wrapped_implementation(module)
    prefix: PrefixKV | None = getattr(module, "litpeft_prefix", None)
    if prefix is not None and not prefix.disabled:
        pk, pv = prefix()
        b = key.shape[0]
        pk = pk.to(key.dtype)[None].expand(b, -1, -1, -1)
        pv = pv.to(value.dtype)[None].expand(b, -1, -1, -1)
        attention_mask = _extend_mask(attention_mask, pk.shape[2], query.shape[2], key.shape[2], query)
        key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
    out, weights = attend(module, query, key, value, attention_mask, **kwargs)

    adaption: AdaptionPrompt | None = getattr(module, "litpeft_adaption", None)
    if adaption is not None and not adaption.disabled:
        ak, av = adaption.key_value(module)
        groups = query.shape[1] // ak.shape[0]
        ak = ak.repeat_interleave(groups, dim=0).to(query.dtype)  # same head grouping as repeat_kv
        av = av.repeat_interleave(groups, dim=0).to(query.dtype)
        scaling = kwargs.get("scaling") or module.head_dim**-0.5
        scores = torch.softmax((query @ ak.transpose(-1, -2)).float() * scaling, dim=-1)
        gate = torch.tanh(adaption.gate.float()).view(1, -1, 1, 1)  # one per head, or one broadcast
        extra = ((gate * scores).to(av.dtype) @ av).transpose(1, 2)
        out = out + extra.to(out.dtype)
    return out, weights


def _register() -> None:
    from transformers.masking_utils import eager_mask, sdpa_mask

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


def attention_modules(model: PreTrainedModel) -> list[nn.Module]:
    """The self-attention modules, in layer order (modules with an integer ``layer_idx`` and ``head_dim``)."""
    mods = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int)
        and hasattr(m, "head_dim")
        and not getattr(m, "is_cross_attention", False)
    ]
    mods.sort(key=lambda m: m.layer_idx)
    return mods


def kv_heads(model: PreTrainedModel) -> int:
    config = model.config.get_text_config()
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
