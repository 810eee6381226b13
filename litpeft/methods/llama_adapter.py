"""LLaMA-Adapter (Zhang et al. 2023, arXiv 2303.16199) and LLaMA-Adapter V2 (Gao et al. 2023, arXiv 2304.15010).

v1: the top ``L`` layers get ``K`` learnable adaption prompts ``P_l`` (K x hidden). Their keys/values come
from the layer's own frozen projections, without rotary encoding; every query attends to them with a
separate softmax, scaled by a zero-initialised gate (paper eq. 8, one gate per head, through ``tanh``)::

    S_g = [ tanh(g_l) * softmax(Q K_p^T / sqrt(d)) ;  softmax(Q K^T / sqrt(d) + mask) ]
    out = S_g [V_p ; V]

so the wrapped model starts exactly at the base model. The term is added inside attention by
:func:`litpeft.methods.attention.peft_attention` (any architecture on transformers' attention interface;
grouped-query attention: prompt K/V have ``num_key_value_heads`` heads, repeated like the layer's own).

v2 adds, on every linear layer, an unlocked bias and scale ``y = s * (W x + b)`` (``b = 0``, ``s = 1`` at
init; paper sec. 3.1 "bias tuning") and makes the normalization layers trainable. :meth:`LlamaAdapterV2.merge`
folds bias/scale (and the tuned norms) into the base weights and returns a plain Hugging Face model; the
gated prompts cannot be folded and stay an adapter: :meth:`LlamaAdapterV2.prompts` gives them as a v1
:class:`LlamaAdapter` (method + tensors) that applies to the merged model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from litpeft.errors import LitPeftError
from litpeft.methods.attention import (
    AttentionCall,
    AttentionState,
    register_attention_slot,
    restore_attention,
    use_peft_attention,
)
from litpeft.methods.base import PeftLayer, PeftMethod, check_arg, find_targets, refuse, replace_module
from litpeft.methods.layout import (
    TrainableNorm,
    attach,
    attention_modules,
    detach,
    head_dim,
    text_config,
    train_norms,
)
from litpeft.quantize import plain_layer

ADAPTION = "litpeft_adaption"  # attention slot that holds a layer's AdaptionPrompt


class AdaptionPrompt(AttentionState):
    """LLaMA-Adapter's adaption prompt of one layer: ``K`` prompt vectors and a zero-init gate.

    The prompt's keys/values come from the layer's own (frozen) key/value projections, without rotary
    encoding (paper sec. 3.2). ``gate`` has one entry per head (``per_head=True``, the paper's choice) or
    one for the layer (peft's ``adaption_prompt``); it enters as ``tanh(gate)``: a separate softmax over
    the prompt keys, scaled per head, added to the attention output (eq. 8).

    Outside autograd (generation), the prompt keys/values are computed once and reused for every token
    until a tensor they depend on changes.
    """

    def __init__(self, hidden_size: int, num_tokens: int, num_heads: int, per_head: bool = True) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(num_tokens, hidden_size, dtype=torch.float32))
        self.gate = nn.Parameter(torch.zeros(num_heads if per_head else 1, dtype=torch.float32))
        self._cached: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def key_value(self, module: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(num_kv_heads, K, head_dim)`` keys and values of the prompt through ``module``'s projections,
        the prompt entering them in ``dtype`` (the stream's: see :func:`prompt_key_value`)."""
        if torch.is_grad_enabled():
            self._cached = None
            return prompt_key_value(module, self.prompt, dtype)
        deps = [self.prompt, *module.parameters()]
        stamp = tuple((p.data_ptr(), p._version, p.dtype) for p in deps) + (
            torch.is_autocast_enabled(self.prompt.device.type),
            dtype,
        )
        if self._cached is None or self._cached[0] != stamp:
            self._cached = (stamp, prompt_key_value(module, self.prompt, dtype))
        return self._cached[1]

    def output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        """``out + tanh(g) * softmax(Q K_p^T / sqrt(d)) V_p`` (eq. 8), in the query's head layout."""
        module, query = call.module, call.query
        ak, av = self.key_value(module, query.dtype)
        groups = query.shape[1] // ak.shape[0]
        ak = ak.repeat_interleave(groups, dim=0).to(query.dtype)  # same head grouping as repeat_kv
        av = av.repeat_interleave(groups, dim=0).to(query.dtype)
        scaling = call.kwargs.get("scaling") or head_dim(module) ** -0.5
        scores = torch.softmax((query @ ak.transpose(-1, -2)).float() * scaling, dim=-1)
        gate = torch.tanh(self.gate.float()).view(1, -1, 1, 1)  # one per head, or one broadcast
        extra = ((gate * scores).to(av.dtype) @ av).transpose(1, 2)
        return out + extra.to(out.dtype)


register_attention_slot(ADAPTION, AdaptionPrompt)


def prompt_key_value(
    module: nn.Module, prompt: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of ``prompt`` (``K x hidden``) by the attention module's own projections, no RoPE.

    The fp32 prompt enters the projections in ``dtype``, the dtype the layer's hidden states have (the
    query's): on a bf16 base outside autocast (``bf16-true``, or a call after ``fit``) the frozen bf16
    projections take bf16 inputs only. The cast is differentiable: the gradient reaches the fp32 prompt.

    Knows the four layouts of the interface's architectures: separate ``k_proj``/``v_proj`` (Llama,
    Mistral, Qwen2/3, Gemma; Qwen3's ``k_norm`` applied), fused ``c_attn`` (GPT-2), fused ``qkv_proj``
    (Phi3) and fused per-head ``query_key_value`` (GPT-NeoX: each head's ``[q | k | v]`` side by side).
    """
    dim = head_dim(module)
    x = prompt[None] if dtype is None else prompt[None].to(dtype)
    if hasattr(module, "k_proj") and hasattr(module, "v_proj"):
        k, v = module.k_proj(x), module.v_proj(x)
    elif hasattr(module, "c_attn") and hasattr(module, "split_size"):  # GPT-2
        _, k, v = module.c_attn(x).split(module.split_size, dim=2)
    elif hasattr(module, "qkv_proj"):  # Phi3: [q | k | v] with q of num_heads * head_dim
        qkv = module.qkv_proj(x)
        q_size = module.config.num_attention_heads * dim
        kv_size = (qkv.shape[-1] - q_size) // 2
        k, v = qkv[..., q_size : q_size + kv_size], qkv[..., q_size + kv_size :]
    elif hasattr(module, "query_key_value"):  # GPT-NeoX: (K, heads, 3 * head_dim), as its forward views it
        qkv = module.query_key_value(x)
        _, k, v = qkv.view(*qkv.shape[:-1], -1, 3 * dim).chunk(3, dim=-1)
        k, v = k.flatten(-2), v.flatten(-2)
    else:
        raise LitPeftError(
            f"LLaMA-Adapter does not know the key/value projections of {type(module).__name__} "
            "(supported: k_proj/v_proj, c_attn, qkv_proj, query_key_value)"
        )
    k = k.view(k.shape[1], -1, dim).transpose(0, 1)
    v = v.view(v.shape[1], -1, dim).transpose(0, 1)
    if hasattr(module, "k_norm"):  # Qwen3-style per-head norm on keys, part of the layer's key map
        k = module.k_norm(k)
    return k, v


class LlamaAdapter(PeftMethod):
    """LLaMA-Adapter v1: zero-init gated adaption prompts in the top layers.

    Args:
        adapter_len: number of adaption prompts ``K`` per layer (the paper: 10).
        adapter_layers: number of top layers ``L`` that get prompts (the paper: 30 of LLaMA-7B's 32);
            ``None``: every layer.
        gate_per_head: one gate per attention head (the paper); off: one gate per layer (peft's form,
            needed to export a trained adapter to peft).
    """

    name = "llama_adapter"
    learning_rate = 9e-3  # configs/llama_adapter.yaml
    exportable_to_peft = True  # for Llama/Mistral with one gate per layer: to_peft checks the model

    def __init__(
        self, adapter_len: int = 10, adapter_layers: int | None = None, gate_per_head: bool = True
    ) -> None:
        check_arg(adapter_len > 0, "adapter_len", adapter_len, "a positive integer")
        check_arg(
            adapter_layers is None or adapter_layers > 0,
            "adapter_layers",
            adapter_layers,
            "a positive integer (or null: every layer)",
        )
        self.adapter_len, self.adapter_layers, self.gate_per_head = adapter_len, adapter_layers, gate_per_head

    def _top_layers(self, model: PreTrainedModel) -> list[nn.Module]:
        modules = attention_modules(model)
        n = len(modules) if self.adapter_layers is None else self.adapter_layers
        if n > len(modules):
            raise LitPeftError(
                f"adapter_layers={self.adapter_layers} but {type(model).__name__} has {len(modules)} layers"
            )
        return modules[len(modules) - n :]

    def inject(self, model: PreTrainedModel) -> None:
        layers = self._top_layers(model)  # validates adapter_layers before the model is touched
        use_peft_attention(model, option=self.name)
        text = text_config(model)
        for m in layers:
            prompt = AdaptionPrompt(
                text.hidden_size, self.adapter_len, text.num_attention_heads, self.gate_per_head
            )
            attach(m, ADAPTION, prompt.to(model.device))

    def to_peft(
        self, model: PreTrainedModel, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """peft ``ADAPTION_PROMPT``: ``adaption_prompt`` ``(1, K, hidden)`` and ``adaption_gate`` ``(1,)``.

        peft multiplies by its gate raw; litpeft by ``tanh(gate)``: the exported gate is ``tanh(gate)``,
        which gives identical outputs. peft has one gate per layer, so per-head gates export only while they
        are all equal (e.g. at step 0). peft's GPT-2 variant adds the prompt term after ``c_proj``
        without projecting it, which is not the paper's formula: only Llama and Mistral export.
        """
        refuse(self.peft_refusal())
        if model.config.model_type not in ("llama", "mistral"):
            raise LitPeftError(
                f"LLaMA-Adapter exports to peft only for llama and mistral models, not {model.config.model_type}"
            )
        tensors = {}
        for key, value in state.items():
            if not key.endswith(f"{ADAPTION}.prompt") and not key.endswith(f"{ADAPTION}.gate"):
                raise LitPeftError(f"{self.name}: '{key}' has no peft adaption_prompt equivalent")
            attn = key.rsplit(f".{ADAPTION}.", 1)[0]
            if key.endswith(".prompt"):
                tensors[f"base_model.model.{attn}.adaption_prompt"] = value[None]
            else:
                if not bool((value == value[0]).all()):
                    raise LitPeftError(
                        f"{self.name}: peft's adaption_prompt has one gate per layer but {attn} has different "
                        "per-head gates; train with gate_per_head: false to export to peft"
                    )
                tensors[f"base_model.model.{attn}.adaption_gate"] = torch.tanh(value[:1])
        layers = len(self._top_layers(model))
        config = {
            "peft_type": "ADAPTION_PROMPT",
            "task_type": "CAUSAL_LM",
            "adapter_len": self.adapter_len,
            "adapter_layers": layers,
            "target_modules": "self_attn",
            "inference_mode": True,
        }
        return config, tensors


class BiasScaleLinear(nn.Module, PeftLayer):
    """LLaMA-Adapter V2's bias tuning of a frozen linear layer: ``y = s * (W x + b0 + b)``, ``b = 0``, ``s = 1``."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        w = base_layer.weight
        out_features = w.shape[1] if isinstance(base_layer, Conv1D) else w.shape[0]
        # fp32 whatever the base's dtype (a bf16 scale near 1 moves only in steps of 2^-8)
        f = {"device": w.device, "dtype": torch.float32}
        self.adapter_bias = nn.Parameter(torch.zeros(out_features, **f))
        self.adapter_scale = nn.Parameter(torch.ones(out_features, **f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        s, b = self.adapter_scale, self.adapter_bias
        if y.dtype == s.dtype:
            return s * (y + b)
        # A bf16 output (autocast, bf16 base): y + (s - 1) y + s b in y's dtype, two fused passes instead of
        # three in fp32. ``s - 1`` keeps the small learned deviations of s that bf16 would round off s itself.
        return torch.addcmul(y, y, (s - 1).to(y.dtype)).add_((s * b).to(y.dtype))

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """A plain layer of the same kind with ``s * W`` and bias ``s * (b0 + b)``."""
        base, s = self.base_layer, self.adapter_scale.float()
        w = base.weight.float()
        w = w.T if isinstance(base, Conv1D) else w  # (out, in)
        b0 = base.bias.float() if base.bias is not None else 0.0
        bias = s * (b0 + self.adapter_bias.float())
        dtype = base.weight.dtype
        return plain_layer(base, (w * s[:, None]).to(dtype), bias.to(dtype))


class LlamaAdapterV2(LlamaAdapter):
    """LLaMA-Adapter V2: v1's gated prompts plus bias/scale on the linear layers and trainable norms.

    Args:
        adapter_len: number of adaption prompts ``K`` per layer.
        adapter_layers: number of top layers with prompts; ``None``: every layer.
        gate_per_head: one gate per head (else one per layer).
        target_modules: linear layers that get bias and scale (names, regex, or ``"all-linear"``: every
            linear layer except the LM head, as the paper).
        train_norms: make the normalization layers trainable (the paper: yes).

    ``merge`` returns the base model with bias/scale folded into the weights and the tuned norms in place:
    a plain Hugging Face model without the prompts. The prompts are :meth:`prompts` (a v1 adapter for the
    merged model). A layer without a bias slot in its architecture (e.g. Qwen2's ``o_proj``) cannot take
    a merged bias: merge then fails with the layer's name.
    """

    name = "llama_adapter_v2"
    learning_rate = 9e-3  # configs/llama_adapter_v2.yaml
    mergeable = True
    exportable_to_peft = False
    not_exportable_reason = (
        "llama_adapter_v2 has no Hugging Face peft equivalent (peft PR #398 was closed); use merge, which "
        "gives a plain HF model plus the prompts as a llama_adapter (v1) adapter"
    )

    def __init__(
        self,
        adapter_len: int = 10,
        adapter_layers: int | None = None,
        gate_per_head: bool = True,
        target_modules: str | list[str] = "all-linear",
        train_norms: bool = True,
    ) -> None:
        super().__init__(adapter_len, adapter_layers, gate_per_head)
        self.target_modules = (
            list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules
        )
        self.train_norms = train_norms

    def inject(self, model: PreTrainedModel) -> None:
        super().inject(model)
        for name in find_targets(model, self.target_modules, (nn.Linear, Conv1D)):
            replace_module(model, name, BiasScaleLinear(model.get_submodule(name)))
        if self.train_norms:
            train_norms(model, slot="tuned")

    def prompts(self, model: nn.Module) -> tuple[LlamaAdapter, dict[str, torch.Tensor]]:
        """The gated prompts as a v1 adapter: ``(method, tensors)``, for the model :meth:`merge` returns."""
        state = {
            k: v.detach().clone() for k, v in self.adapter_state_dict(model).items() if f".{ADAPTION}." in k
        }
        return LlamaAdapter(self.adapter_len, self.adapter_layers, self.gate_per_head), state

    def unmerged_part(self, model: nn.Module) -> tuple[LlamaAdapter, dict[str, torch.Tensor]]:
        return self.prompts(model)

    def merge(self, model: PreTrainedModel) -> PreTrainedModel:
        """Fold bias/scale and tuned norms into the base; remove the prompts; return a plain HF model."""
        for name, module in list(model.named_modules()):
            if isinstance(module, (BiasScaleLinear, TrainableNorm)):  # each merged into a plain layer
                replace_module(model, name, module.merged())
        for m in attention_modules(model):
            detach(m, ADAPTION)
        restore_attention(model)
        _fit_config_to_biases(model)
        model.requires_grad_(False)
        return model


def _fit_config_to_biases(model: PreTrainedModel) -> None:
    """Make the config describe the merged biases, so ``from_pretrained`` builds (and loads) them.

    Turns on the config's bias switches (``attention_bias``, ``mlp_bias``: Llama-style models) as
    needed and gives every layer such a switch adds a zero bias if it has none.
    """

    def expected() -> set[str]:
        with torch.device("meta"):
            return set(AutoModelForCausalLM.from_config(copy.deepcopy(model.config)).state_dict())

    have = set(model.state_dict())
    extra = have - expected()
    for switch in ("attention_bias", "mlp_bias"):
        if not extra:
            break
        if getattr(model.config, switch, None) is False:
            setattr(model.config, switch, True)
            if len(have - expected()) < len(extra):
                extra = have - expected()
            else:
                setattr(model.config, switch, False)
    if extra:
        layers = sorted({k.rsplit(".", 1)[0] for k in extra})
        raise LitPeftError(
            f"llama_adapter_v2 merge: {type(model).__name__} has no bias in {layers[:3]} "
            f"({len(layers)} layers); exclude them with target_modules"
        )
    for key in sorted(expected() - have):
        if not key.endswith(".bias"):
            continue
        layer = model.get_submodule(key.rsplit(".", 1)[0])
        out = layer.weight.shape[1] if isinstance(layer, Conv1D) else layer.weight.shape[0]
        layer.bias = nn.Parameter(torch.zeros(out, dtype=layer.weight.dtype, device=layer.weight.device))
