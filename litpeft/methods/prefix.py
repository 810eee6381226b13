"""Prefix tuning (Li & Liang 2021, arXiv 2101.00190); P-tuning v2 (:mod:`litpeft.methods.p_tuning_v2`) is
the same mechanism without the reparameterization.

Both give every layer ``N`` trainable key/value vectors that each query attends to before the real tokens
(paper eq. 2: ``h_i = P_theta[i, :]`` for ``i`` in the prefix). The prefix occupies positions ``0..N-1``,
so the real tokens start at position ``N`` (a forward pre-hook on the backbone shifts the position ids);
Hugging Face peft's ``past_key_values`` prefix gives the same positions.

- Prefix tuning trains the prefix through the paper's reparameterization (sec. 4.3, eq. 5)
  ``P_theta = MLP_theta(P'_theta)``: an embedding ``P'`` (N x d), ``Linear -> Tanh -> Linear`` to
  ``layers x 2 x kv_dim``, with prefix dropout. After training only ``P_theta`` is needed: the saved
  adapter holds the projected prefix, not the MLP.
- P-tuning v2 trains the per-layer prompts directly (no reparameterization by default; ``prefix_projection``
  turns the same MLP on).

The prefix keys/values have ``num_key_value_heads`` heads; they are added inside attention by
:func:`litpeft.methods.attention.peft_attention`, so the KV cache never holds them and gradient
checkpointing and ``generate`` work unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from litpeft.deprecation import moved_names
from litpeft.errors import LitPeftError
from litpeft.methods.attention import (
    AttentionCall,
    AttentionState,
    register_attention_slot,
    use_peft_attention,
)
from litpeft.methods.base import Dropout, PeftMethod, check_arg
from litpeft.methods.layout import (
    attach,
    attached,
    attention_modules,
    detach,
    head_dim,
    kv_heads,
    max_positions,
    text_config,
)
from litpeft.methods.prompt import _load_tokenizer

__getattr__ = moved_names(__name__, {"PTuningV2": "litpeft.methods.p_tuning_v2"})  # adapters saved before

PREFIX = "litpeft_prefix"  # attention slot that holds a layer's PrefixKV
ENCODER = "litpeft_prefix_encoder"  # slot of the model that holds the reparameterization MLP


class PrefixKV(AttentionState):
    """Prefix keys and values of one layer, each ``(num_kv_heads, N, head_dim)`` (paper eq. 2).

    The tensors come from ``source(layer_idx)`` (a shared reparameterization, prefix tuning) or are this
    module's own parameters ``key``/``value`` (P-tuning v2, or prefix tuning after the MLP is dropped),
    standard normal or ``init`` (fp32 parameters whatever the base's dtype).
    They are prepended to the layer's keys/values and the mask is extended so that every query (padding
    or not) sees the whole prefix, except on a sliding-window layer, where the prefix leaves the window
    like any past token (:func:`_visible_prefix`). They have ``num_key_value_heads`` heads, so grouped-query attention
    needs nothing special: the wrapped implementation repeats them as it repeats the layer's own keys.
    """

    def __init__(
        self,
        layer_idx: int,
        num_kv_heads: int,
        num_tokens: int,
        head_dim: int,
        source: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
        dropout: float = 0.0,
        init: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.layer_idx, self.num_tokens = layer_idx, num_tokens
        self.source = source
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_parameter("key", None)
        self.register_parameter("value", None)
        if source is None:
            shape = (num_kv_heads, num_tokens, head_dim)
            key, value = init if init is not None else (torch.randn(shape), torch.randn(shape))
            self.key, self.value = nn.Parameter(key.float()), nn.Parameter(value.float())

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.source(self.layer_idx) if self.source is not None else (self.key, self.value)
        return self.dropout(k), self.dropout(v)

    def keys_values(self, call: AttentionCall) -> AttentionCall:
        pk, pv = self()
        key, value = call.key, call.value
        pk = pk.to(key.dtype)[None].expand(key.shape[0], -1, -1, -1)
        pv = pv.to(value.dtype)[None].expand(key.shape[0], -1, -1, -1)
        q_len, kwargs = call.query.shape[2], call.kwargs
        visible = _visible_prefix(
            pk.shape[2], q_len, kwargs.get("position_ids"), kwargs.get("sliding_window"), call.query
        )
        return replace(
            call,
            key=torch.cat([pk, key], dim=2),
            value=torch.cat([pv, value], dim=2),
            mask=_extend_mask(call.mask, visible, key.shape[2]),
        )


register_attention_slot(PREFIX, PrefixKV)


def _visible_prefix(
    num_prefix: int, q_len: int, positions: torch.Tensor | None, window: int | None, like: torch.Tensor
) -> torch.Tensor:
    """Which prefix keys each query sees, ``(B or 1, 1, q, N)`` bool.

    The prefix holds positions ``0..N-1`` as past tokens do in peft's ``past_key_values`` (and the paper's
    activations of a prefix), so on a sliding-window layer (Gemma 2/3, Mistral) it leaves the window as
    any past token would: prefix key ``j`` is visible to the query at position ``p`` (the shifted
    ``position_ids``: a packed sample's restart) iff ``p - j < sliding_window``, transformers' rule.
    """
    if window is None or positions is None:
        return torch.ones(1, 1, q_len, num_prefix, dtype=torch.bool, device=like.device)
    j = torch.arange(num_prefix, device=like.device)
    return (positions[:, None, -q_len:, None] - j < window).to(like.device)


def _extend_mask(mask: torch.Tensor | None, visible: torch.Tensor, kv_len: int) -> torch.Tensor | None:
    """Prepend the prefix key columns (``visible``) to an sdpa (bool) or eager (additive) mask."""
    q_len = visible.shape[2]
    if mask is None:
        if q_len == 1 and bool(visible.all()):
            return None  # one query sees every key, prefix included
        # None meant "plain causal" (sdpa's is_causal, aligned to the last key): materialize it.
        i = torch.arange(q_len, device=visible.device)[:, None]
        j = torch.arange(kv_len, device=visible.device)[None, :]
        mask = (j <= i + (kv_len - q_len))[None, None]
    if mask.dtype != torch.bool:
        blocked = torch.finfo(mask.dtype).min
        visible = torch.zeros(visible.shape, dtype=mask.dtype, device=mask.device).masked_fill(
            ~visible, blocked
        )
    shape = torch.broadcast_shapes(mask.shape[:-1], visible.shape[:-1])
    return torch.cat([visible.expand(*shape, -1), mask.expand(*shape, -1)], dim=-1)


class PrefixEncoder(nn.Module):
    """``P_theta = MLP(P')``: embedding ``(N, embedding_dim)`` -> Linear -> Tanh -> Linear to ``L*2*kv_dim``.

    Same layout as peft's ``PrefixEncoder``: output column block ``2*l`` is layer ``l``'s keys, ``2*l+1``
    its values, each ``(num_kv_heads, head_dim)``. Each layer computes only its own rows of the last
    linear map, so no layer pays for the others (and gradient checkpointing recomputes per layer).
    """

    def __init__(
        self,
        num_tokens: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        hidden: int,
        embedding_dim: int,
    ) -> None:
        super().__init__()
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        kv_dim = num_kv_heads * head_dim
        self.embedding = nn.Embedding(num_tokens, embedding_dim)
        self.transform = nn.Sequential(
            nn.Linear(embedding_dim, hidden), nn.Tanh(), nn.Linear(hidden, num_layers * 2 * kv_dim)
        )

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.transform[1](self.transform[0](self.embedding.weight))
        out = self.transform[2]
        rows = slice(
            idx * 2 * self.num_kv_heads * self.head_dim, (idx + 1) * 2 * self.num_kv_heads * self.head_dim
        )
        kv = F.linear(h, out.weight[rows], out.bias[rows])  # (N, 2 * kv_dim)
        kv = kv.view(kv.shape[0], 2, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return kv[0], kv[1]


class PrefixTuning(PeftMethod):
    """Prefix tuning: ``N`` trainable key/value vectors per layer, through a reparameterization MLP.

    Args:
        num_virtual_tokens: prefix length ``N``.
        prefix_projection: train through the MLP (the paper's reparameterization); off: train the prefix
            directly (that is P-tuning v2).
        encoder_hidden_size: hidden width of the MLP; ``None``: ``kv_dim`` (peft's default). Li & Liang
            used 512 (summarization) and 800 (table-to-text).
        embedding_dim: width of ``P'``; ``None``: ``kv_dim`` (= num_key_value_heads * head_dim, as peft).
        prefix_dropout: dropout on the prefix keys/values in training (the paper's prefix dropout).
        init_text: start the prefix at the frozen model's own keys/values of this text (Li & Liang sec. 7.2:
            "initializing the prefix with activations of real words"): the text's tokens, repeated or
            truncated to ``N``, encoded by the base model at positions ``0..N-1``; step 0 is then the base
            model reading that text before the input. ``None``: standard normal. Needs
            ``prefix_projection: false`` (the MLP's output cannot be set per token).
        tokenizer: model spec whose tokenizer tokenizes ``init_text``; default the base model's own.
    """

    name = "prefix_tuning"
    learning_rate = 5e-4  # configs/prefix_tuning.yaml
    exportable_to_peft = True

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        prefix_projection: bool = True,
        encoder_hidden_size: int | None = None,
        embedding_dim: int | None = None,
        prefix_dropout: float = 0.0,
        init_text: str | None = None,
        tokenizer: str | None = None,
    ) -> None:
        check_arg(num_virtual_tokens > 0, "num_virtual_tokens", num_virtual_tokens, "a positive integer")
        check_arg(init_text is None or init_text != "", "init_text", init_text, "a text (or null: random)")
        if init_text is not None and prefix_projection:
            raise LitPeftError(
                f"{self.name}: init_text sets the prefix keys/values directly, which the reparameterization "
                "MLP cannot start at; set prefix_projection: false"
            )
        for option, value in (("encoder_hidden_size", encoder_hidden_size), ("embedding_dim", embedding_dim)):
            check_arg(value is None or value > 0, option, value, "a positive integer (or null: the default)")
        check_arg(
            0.0 <= prefix_dropout < 1.0, "prefix_dropout", prefix_dropout, "a dropout probability in [0, 1)"
        )
        self.num_virtual_tokens, self.prefix_projection = num_virtual_tokens, prefix_projection
        self.encoder_hidden_size, self.embedding_dim = encoder_hidden_size, embedding_dim
        self.prefix_dropout, self.init_text, self.tokenizer = prefix_dropout, init_text, tokenizer

    def inject(self, model: PreTrainedModel) -> None:
        use_peft_attention(model, option=self.name)
        modules = attention_modules(model)
        init = self._text_keys_values(model, modules) if self.init_text is not None else {}
        n_kv, dim = kv_heads(model), head_dim(modules[0])
        kv_dim = n_kv * dim
        source = None
        if self.prefix_projection:
            encoder = PrefixEncoder(
                self.num_virtual_tokens,
                len(modules),
                n_kv,
                dim,
                self.encoder_hidden_size or kv_dim,
                self.embedding_dim or kv_dim,
            ).to(model.device)
            source = attach(model, ENCODER, encoder).layer
        layers = []
        for m in modules:
            prefix = PrefixKV(
                m.layer_idx,
                n_kv,
                self.num_virtual_tokens,
                dim,
                source,
                self.prefix_dropout,
                init.get(m.layer_idx),
            )
            layers.append(attach(m, PREFIX, prefix.to(model.device)))
        model.base_model.register_forward_pre_hook(
            _PositionShift(layers[0], self.num_virtual_tokens, max_positions(model)), with_kwargs=True
        )

    def _text_keys_values(
        self, model: PreTrainedModel, modules: list[nn.Module]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """layer index -> the base model's keys and values ``(num_kv_heads, N, head_dim)`` of ``init_text``'s
        tokens repeated or truncated to ``N`` (as prompt tuning's ``init: text``), after rotary encoding at
        positions ``0..N-1``: the past keys/values of the text, what the prefix stands for."""
        n = self.num_virtual_tokens
        ids = _load_tokenizer(self.tokenizer, model, "init_text")(self.init_text, add_special_tokens=False)
        ids = ids["input_ids"]
        if not ids:
            raise LitPeftError(f"{self.name}: init_text tokenizes to no tokens")
        ids = (ids * math.ceil(n / len(ids)))[:n]
        if n >= max_positions(model):
            raise LitPeftError(
                f"num_virtual_tokens={n} leaves no room for input in the model's context of {max_positions(model)}"
            )
        if model.device.type == "meta":  # a rank that receives rank 0's weights (FSDP): shapes only
            return {}
        cache = DynamicCache()  # no config: sliding-window layers keep every token too
        # Under *-mixed PeftLM loads the frozen linears in 16 bits and makes them callable outside autocast
        # only after the method is applied: read the text under autocast, as training will.
        half = [p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)]
        mixed = bool(half) and any(p.dtype == torch.float32 for p in model.parameters())
        training = model.training
        model.eval()
        with torch.no_grad(), torch.autocast(model.device.type, half[0] if mixed else None, enabled=mixed):
            model(input_ids=torch.tensor([ids], device=model.device), cache=cache, use_cache=True)
        model.train(training)
        layers = cache.layers
        return {m.layer_idx: (layers[m.layer_idx].keys[0], layers[m.layer_idx].values[0]) for m in modules}

    # -- adapter: the projected prefix only -----------------------------------------------------------
    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Per-layer ``...litpeft_prefix.key/value`` ``(num_kv_heads, N, head_dim)``; the MLP is not saved."""
        if attached(model, ENCODER) is None:
            return super().adapter_state_dict(model)
        with torch.no_grad():
            state = {}
            for name, m in model.named_modules():
                if isinstance(m, PrefixKV):
                    k, v = m.source(m.layer_idx)
                    state[f"{name}.key"], state[f"{name}.value"] = k.detach().clone(), v.detach().clone()
        return state

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        drop_reparameterization(model)
        super().load_adapter_state_dict(model, state)

    def to_peft(
        self, model: PreTrainedModel, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """peft ``PREFIX_TUNING`` in inference form: ``prompt_embeddings`` ``(N, layers * 2 * kv_dim)``.

        peft lays each virtual token's row out as ``[layer][key|value][kv head][head_dim]``.
        """
        modules = attention_modules(model)
        names = {m: n for n, m in model.named_modules()}
        rows = []
        for m in modules:
            key, value = state[f"{names[m]}.{PREFIX}.key"], state[f"{names[m]}.{PREFIX}.value"]
            rows += [key.permute(1, 0, 2).flatten(1), value.permute(1, 0, 2).flatten(1)]  # (N, kv_dim) each
        kv_dim = kv_heads(model) * head_dim(modules[0])
        text = text_config(model)
        config = {
            "peft_type": "PREFIX_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": kv_dim,
            "num_transformer_submodules": 1,
            "num_attention_heads": kv_heads(model),
            "num_layers": len(modules),
            "encoder_hidden_size": self.encoder_hidden_size or kv_dim,
            # The exported prefix is already projected: peft loads it as is (prefix_projection=False).
            "prefix_projection": False,
            "inference_mode": True,
            "base_model_name_or_path": getattr(text, "_name_or_path", None) or None,
        }
        return config, {"prompt_embeddings": torch.cat(rows, dim=1).contiguous()}


def drop_reparameterization(model: nn.Module) -> None:
    """Replace the MLP by the prefix it produces (own ``key``/``value`` per layer), as for a saved adapter."""
    if attached(model, ENCODER) is None:
        return
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PrefixKV) and m.source is not None:
                k, v = m.source(m.layer_idx)
                m.key, m.value = nn.Parameter(k.detach().clone()), nn.Parameter(v.detach().clone())
                m.source = None
    detach(model, ENCODER)


class _PositionShift:
    """Forward pre-hook on the backbone: real tokens start at position ``N`` (the prefix holds 0..N-1).

    Refuses positions past the model's context (GPT-2's learned position table would fail with an index
    error, on CUDA a device-side assert).
    """

    def __init__(self, prefix: PrefixKV, num_tokens: int, max_positions: int) -> None:
        self.prefix, self.num_tokens, self.max_positions = prefix, num_tokens, max_positions

    def __call__(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        if self.prefix.disabled:
            return args, kwargs
        positions = kwargs.get("position_ids")
        if positions is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            tokens = ids if ids is not None else kwargs["inputs_embeds"]
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None else 0
            positions = torch.arange(past, past + tokens.shape[1], device=tokens.device)[None]
        kwargs["position_ids"] = positions + self.num_tokens
        last = int(positions.max()) + 1 if positions.numel() else 0
        if last + self.num_tokens > self.max_positions:
            raise LitPeftError(
                f"num_virtual_tokens={self.num_tokens} plus {last} positions exceed the model's context of "
                f"{self.max_positions} positions"
            )
        return args, kwargs
