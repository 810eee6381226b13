"""Prefix tuning (Li & Liang 2021, arXiv 2101.00190) and P-tuning v2 (Liu et al. 2022, arXiv 2110.07602).

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

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from litpeft.errors import LitPeftError
from litpeft.methods.attention import AttentionState, register_attention_slot, use_peft_attention
from litpeft.methods.base import Dropout, PeftMethod, check_arg
from litpeft.methods.layout import (
    attach,
    attached,
    attention_modules,
    detach,
    kv_heads,
    max_positions,
    text_config,
)

PREFIX = "litpeft_prefix"  # attention slot that holds a layer's PrefixKV
ENCODER = "litpeft_prefix_encoder"  # slot of the model that holds the reparameterization MLP


class PrefixKV(AttentionState):
    """Prefix keys and values of one layer, each ``(num_kv_heads, N, head_dim)`` (paper eq. 2).

    The tensors come from ``source(layer_idx)`` (a shared reparameterization, prefix tuning) or are this
    module's own parameters ``key``/``value`` (P-tuning v2, or prefix tuning after the MLP is dropped).
    They are prepended to the layer's keys/values and the mask is extended so that every query (padding
    or not) sees the whole prefix. They have ``num_key_value_heads`` heads, so grouped-query attention
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

    def keys_values(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        pk, pv = self()
        b = key.shape[0]
        pk = pk.to(key.dtype)[None].expand(b, -1, -1, -1)
        pv = pv.to(value.dtype)[None].expand(b, -1, -1, -1)
        mask = _extend_mask(mask, pk.shape[2], query.shape[2], key.shape[2], query)
        return torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2), mask


register_attention_slot(PREFIX, PrefixKV)


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
    ) -> None:
        check_arg(num_virtual_tokens > 0, "num_virtual_tokens", num_virtual_tokens, "a positive integer")
        for option, value in (("encoder_hidden_size", encoder_hidden_size), ("embedding_dim", embedding_dim)):
            check_arg(value is None or value > 0, option, value, "a positive integer (or null: the default)")
        check_arg(
            0.0 <= prefix_dropout < 1.0, "prefix_dropout", prefix_dropout, "a dropout probability in [0, 1)"
        )
        self.num_virtual_tokens, self.prefix_projection = num_virtual_tokens, prefix_projection
        self.encoder_hidden_size, self.embedding_dim = encoder_hidden_size, embedding_dim
        self.prefix_dropout = prefix_dropout

    def inject(self, model: PreTrainedModel) -> None:
        use_peft_attention(model, option=self.name)
        modules = attention_modules(model)
        n_kv, head_dim = kv_heads(model), modules[0].head_dim
        kv_dim = n_kv * head_dim
        source = None
        if self.prefix_projection:
            encoder = PrefixEncoder(
                self.num_virtual_tokens,
                len(modules),
                n_kv,
                head_dim,
                self.encoder_hidden_size or kv_dim,
                self.embedding_dim or kv_dim,
            ).to(model.device)
            source = attach(model, ENCODER, encoder).layer
        layers = []
        for m in modules:
            prefix = PrefixKV(
                m.layer_idx, n_kv, self.num_virtual_tokens, head_dim, source, self.prefix_dropout
            )
            layers.append(attach(m, PREFIX, prefix.to(model.device)))
        model.base_model.register_forward_pre_hook(
            _PositionShift(layers[0], self.num_virtual_tokens, max_positions(model)), with_kwargs=True
        )

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
        n_kv = kv_heads(model)
        text = text_config(model)
        config = {
            "peft_type": "PREFIX_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": n_kv * modules[0].head_dim,
            "num_transformer_submodules": 1,
            "num_attention_heads": n_kv,
            "num_layers": len(modules),
            "encoder_hidden_size": self.encoder_hidden_size or n_kv * modules[0].head_dim,
            # The exported prefix is already projected: peft loads it as is (prefix_projection=False).
            "prefix_projection": False,
            "inference_mode": True,
            "base_model_name_or_path": getattr(text, "_name_or_path", None) or None,
        }
        return config, {"prompt_embeddings": torch.cat(rows, dim=1).contiguous()}


class PTuningV2(PrefixTuning):
    """P-tuning v2: deep prompts, trainable key/value prefixes on every layer, no reparameterization.

    Args:
        num_virtual_tokens: prompt length ``N`` per layer.
        prefix_projection: train through prefix tuning's MLP instead (the paper's optional
            reparameterization, useful on some tasks, sec. 3.3).
        encoder_hidden_size: MLP width when ``prefix_projection``; ``None``: ``kv_dim``.
        embedding_dim: embedding width when ``prefix_projection``; ``None``: ``kv_dim``.
        prefix_dropout: dropout on the prompt keys/values in training.
    """

    name = "p_tuning_v2"
    learning_rate = 5e-4  # configs/p_tuning_v2.yaml

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        prefix_projection: bool = False,
        encoder_hidden_size: int | None = None,
        embedding_dim: int | None = None,
        prefix_dropout: float = 0.0,
    ) -> None:
        super().__init__(
            num_virtual_tokens, prefix_projection, encoder_hidden_size, embedding_dim, prefix_dropout
        )


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
