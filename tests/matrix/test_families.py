"""The tiny model families (``litpeft.tiny``) and the one-line family refusals (``litpeft.methods.families``)."""

from __future__ import annotations

import pytest
import torch

from litpeft import models, tiny
from litpeft.errors import LitPeftError
from litpeft.methods import LlamaAdapter, LlamaAdapterV2, LoRA, PrefixTuning, PTuningV2
from litpeft.methods.families import family_refusal
from litpeft.models import load_model

#: family -> (model class, GQA, tied embeddings)
EXPECTED = {
    "llama": ("LlamaForCausalLM", True, True),
    "llama3": ("LlamaForCausalLM", True, True),
    "qwen2": ("Qwen2ForCausalLM", True, False),
    "qwen3": ("Qwen3ForCausalLM", True, True),
    "qwen3_moe": ("Qwen3MoeForCausalLM", True, False),
    "mistral": ("MistralForCausalLM", True, False),
    "gemma2": ("Gemma2ForCausalLM", True, True),
    "gemma3": ("Gemma3ForCausalLM", True, True),
    "phi3": ("Phi3ForCausalLM", True, False),
    "gpt2": ("GPT2LMHeadModel", False, True),
    "gpt_neox": ("GPTNeoXForCausalLM", False, False),
    "olmo2": ("Olmo2ForCausalLM", True, False),
    "granite": ("GraniteForCausalLM", True, True),
}


def test_models_reexports_the_tiny_layer() -> None:
    assert models.TINY_CONFIGS is tiny.TINY_CONFIGS and models.tiny_tokenizer is tiny.tiny_tokenizer
    assert set(tiny.TINY_CONFIGS) == set(EXPECTED)


@pytest.mark.parametrize("family", list(EXPECTED))
def test_tiny_family_is_small_faithful_and_deterministic(family: str) -> None:
    state = torch.random.get_rng_state()
    model = load_model(f"tiny:{family}")
    assert torch.equal(torch.random.get_rng_state(), state)  # built under a private seed
    cls, gqa, tied = EXPECTED[family]
    config = model.config
    assert type(model).__name__ == cls
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    assert (kv < config.num_attention_heads) == gqa
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    again = load_model(f"tiny:{family}")
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_family_specific_features_are_there() -> None:
    assert load_model("tiny:llama3").config.rope_parameters["rope_type"] == "llama3"
    gemma2 = load_model("tiny:gemma2").config
    assert gemma2.attn_logit_softcapping and gemma2.final_logit_softcapping and gemma2.sliding_window
    assert load_model("tiny:gemma3").config.layer_types == ["sliding_attention", "full_attention"]
    assert load_model("tiny:gpt_neox").config.rope_parameters["partial_rotary_factor"] == 0.25
    assert load_model("tiny:granite").config.logits_scaling == 8.0
    assert hasattr(load_model("tiny:qwen3").model.layers[0].self_attn, "k_norm")
    experts = load_model("tiny:qwen3_moe").model.layers[0].mlp.experts
    assert experts.gate_up_proj.dim() == 3  # one tensor for all experts: no nn.Linear to wrap


@pytest.mark.parametrize("make", [PrefixTuning, PTuningV2, LlamaAdapter, LlamaAdapterV2])
def test_attention_slot_methods_shape_gpt_neox_heads(make: type) -> None:
    """GPT-NeoX's attention has ``head_size``, not ``head_dim`` (the slots crashed with an IndexError, or
    claimed the model had 0 layers, then were refused): the head width is hidden_size / num_attention_heads."""
    model = load_model("tiny:gpt_neox")
    assert family_refusal(make(), model) is None
    method = make(adapter_layers=2) if make in (LlamaAdapter, LlamaAdapterV2) else make(num_virtual_tokens=3)
    method.apply(model)
    slots = [m for n, m in model.named_modules() if n.endswith(("litpeft_prefix", "litpeft_adaption"))]
    assert len(slots) == 2  # one per layer
    if make in (PrefixTuning, PTuningV2):
        assert slots[0]()[0].shape == (4, 3, 64 // 4)
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, model.config.vocab_size)


@pytest.mark.parametrize("make", [LlamaAdapter, LlamaAdapterV2])
def test_llama_adapter_refuses_olmo2_whole_width_key_norm(make: type) -> None:
    """OLMo 2 normalizes k over all heads at once; LLaMA-Adapter's per-head prompt keys crashed with a
    size mismatch in the first forward."""
    with pytest.raises(LitPeftError, match="normalizes the keys of all heads together"):
        make().apply(load_model("tiny:olmo2"))
    assert family_refusal(PrefixTuning(), load_model("tiny:olmo2")) is None  # prefix K/V need no k_norm


def test_moe_experts_are_refused_as_lora_targets() -> None:
    """LoRA on Qwen3-MoE: all-linear wraps the attention projections; naming the experts' 3-D tensors
    (not nn.Linear) is refused with one line instead of silently training attention only."""
    with pytest.raises(LitPeftError, match=r"experts hold down_proj as 3-D tensors"):
        LoRA(r=2, target_modules=["q_proj", "down_proj"]).apply(load_model("tiny:qwen3_moe"))
    with pytest.raises(LitPeftError, match=r"experts hold gate_up_proj as 3-D tensors"):
        LoRA(r=2, target_modules=r".*mlp\.experts\.gate_up_proj").apply(load_model("tiny:qwen3_moe"))
    model = LoRA(r=2, target_modules="all-linear").apply(load_model("tiny:qwen3_moe"))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".self_attn.q_proj." in n for n in trained)
    assert not any("experts" in n for n in trained)
