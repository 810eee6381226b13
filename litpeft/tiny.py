"""Tiny random models of the families people fine-tune, for tests and dry runs (``tiny:<arch>``).

Each entry of :data:`TINY_CONFIGS` is built from the family's own transformers config class (hidden size
64, 2 layers, 4 heads), structurally faithful where it matters to a PEFT method: grouped-query attention
where the family has it, tied embeddings where the family ties them, and the family's own attention,
norm and rotary details (Llama 3's ``llama3`` RoPE scaling, Qwen3's and OLMo 2's q/k norms, Gemma 2's
logit soft-capping and alternating sliding-window layers, Gemma 3's local/global RoPE, Phi-3's fused
projections, GPT-NeoX's partial rotary and parallel residual, Granite's multipliers, Qwen3-MoE's
experts). Weights come from a fixed seed and a byte-level tokenizer built offline: deterministic.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from litpeft.errors import LitPeftError

_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SHAPE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
)
_GQA: dict[str, Any] = dict(_SHAPE, num_key_value_heads=2)

# ``vocab_size`` is filled in from the tiny tokenizer. The first five entries are the original ones,
# unchanged (tests pin their numbers); the others add one family each.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", **_GQA, tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", **_GQA, tie_word_embeddings=False),  # Qwen2 / Qwen2.5 (q/k/v bias)
    "mistral": dict(model_type="mistral", **_GQA, sliding_window=None),
    "phi3": dict(model_type="phi3", **_GQA),  # fused qkv_proj and gate_up_proj
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512),  # Conv1D layers
    # Llama 3.x: GQA, tied embeddings (3.2 1B/3B), RoPE theta 500000 with the "llama3" frequency scaling
    "llama3": dict(
        model_type="llama",
        **_GQA,
        tie_word_embeddings=True,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    # Qwen3: per-head RMSNorm on q and k, no q/k/v bias, tied embeddings (0.6B-4B)
    "qwen3": dict(model_type="qwen3", **_GQA, head_dim=16, tie_word_embeddings=True),
    # Qwen3-MoE: experts are 3-D parameter tensors (``mlp.experts.gate_up_proj``), not nn.Linear layers
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        **_GQA,
        head_dim=16,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    ),
    # Gemma 2: head_dim 16, soft-capped attention and final logits, sliding window on every other layer,
    # embeddings scaled by sqrt(hidden), pre- and post-norms around attention and MLP
    "gemma2": dict(
        model_type="gemma2",
        **_GQA,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
    ),
    # Gemma 3 (text): q/k norms, local (sliding) and global layers with their own RoPE
    "gemma3": dict(
        model_type="gemma3_text",
        **_GQA,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=True,
    ),
    # GPT-NeoX (Pythia): fused query_key_value, partial rotary (25%), parallel residual, LayerNorm
    "gpt_neox": dict(
        model_type="gpt_neox",
        **_SHAPE,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25),
        use_parallel_residual=True,
        tie_word_embeddings=False,
    ),
    # OLMo 2: norms after attention and MLP (not before), RMSNorm on the full q and k projections
    "olmo2": dict(model_type="olmo2", **_GQA, tie_word_embeddings=False),
    # Granite: embedding, residual and attention multipliers, logits divided by logits_scaling
    "granite": dict(
        model_type="granite",
        **_GQA,
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        attention_multiplier=0.0625,
        logits_scaling=8.0,
        tie_word_embeddings=True,
    ),
}


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer (256 byte tokens + chat specials) built offline, with a ChatML template."""
    byte_to_char = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_to_char))}
    backend = Tokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = _CHATML_TEMPLATE
    return tok


def _tiny_model(arch: str, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The ``tiny:<arch>`` model: random weights from seed 0 (the global RNG is left untouched)."""
    if arch not in TINY_CONFIGS:
        raise LitPeftError(
            f"unknown tiny model 'tiny:{arch}'; choose one of: {', '.join(sorted(TINY_CONFIGS))}"
        )
    kwargs = dict(TINY_CONFIGS[arch])
    model_type = kwargs.pop("model_type")
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        **kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config)


__all__ = ["TINY_CONFIGS", "tiny_tokenizer"]
