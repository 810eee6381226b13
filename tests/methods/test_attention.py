"""The shared attention function: wraps sdpa and eager alike, masks (none, padding, causal with a cache
offset), the prefix kept out of the KV cache, and the errors for what it cannot wrap."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from litpeft.errors import LitPeftError
from litpeft.methods import PrefixTuning, attention
from litpeft.methods.attention import cpu_sdpa_attention, restore_attention, use_peft_attention
from litpeft.methods.layout import attach, attention_modules
from litpeft.methods.llama_adapter import ADAPTION, AdaptionPrompt, prompt_key_value
from litpeft.models import load_model, tiny_tokenizer

ARCHS = ["llama", "qwen2", "gpt2", "mistral", "phi3", "gpt_neox"]
TEXTS = ["Attention is all you need, and a prefix.", "Short one"]


def both_methods(arch: str, implementation: str) -> torch.nn.Module:
    """A tiny model with a prefix (prefix tuning) and a gated adaption prompt with non-zero gates on every layer."""
    model = load_model(f"tiny:{arch}", tokenizer=tiny_tokenizer())
    model.set_attn_implementation(implementation)
    torch.manual_seed(0)
    PrefixTuning(num_virtual_tokens=3, encoder_hidden_size=16).apply(model)
    config = model.config
    for m in attention_modules(model):
        prompt = attach(m, ADAPTION, AdaptionPrompt(config.hidden_size, 4, config.num_attention_heads))
        torch.nn.init.uniform_(prompt.gate, -2.0, 2.0)
    return model.eval()


def encode(side: str) -> dict[str, torch.Tensor]:
    tok = tiny_tokenizer()
    tok.padding_side = side
    return dict(tok(TEXTS, return_tensors="pt", padding=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_finds_every_attention_layer(arch):
    model = load_model(f"tiny:{arch}", tokenizer=tiny_tokenizer())
    assert [m.layer_idx for m in attention_modules(model)] == list(range(model.config.num_hidden_layers))


@pytest.mark.parametrize("arch", ARCHS)
def test_sdpa_and_eager_wrapped_alike(arch):
    """The same prefix + adaption prompt through sdpa (bool masks, or none) and eager (additive masks)."""
    sdpa, eager = both_methods(arch, "sdpa"), both_methods(arch, "eager")
    assert sdpa.config._attn_implementation == "litpeft_sdpa"
    assert eager.config._attn_implementation == "litpeft_eager"
    for side in ("left", "right"):
        enc = encode(side)
        keep = enc["attention_mask"].bool()
        with torch.no_grad():
            a, b = sdpa(**enc).logits, eager(**enc).logits
        torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=1e-5)
    # no attention mask at all: sdpa gets mask=None (its is_causal shortcut), which must become causal + prefix
    ids = encode("right")["input_ids"][:1]
    with torch.no_grad():
        torch.testing.assert_close(
            sdpa(input_ids=ids).logits, eager(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_with_cache_equals_one_pass(arch):
    """Queries after cached keys: the causal mask is offset by the cache, the prefix stays in front."""
    model = both_methods(arch, "sdpa")
    ids = encode("right")["input_ids"][:1]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :5], use_cache=True)
        assert first.past_key_values.get_seq_length() == 5  # the prefix is not in the cache
        second = model(input_ids=ids[:, 5:], cache=first.past_key_values, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first.logits, second], dim=1), full, atol=1e-5, rtol=1e-5)


def test_restore_attention():
    model = load_model("tiny:llama", tokenizer=tiny_tokenizer())
    use_peft_attention(model)
    assert model.config._attn_implementation == "litpeft_sdpa"
    use_peft_attention(model)  # idempotent
    restore_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_unsupported_implementation_is_named():
    model = load_model("tiny:llama", tokenizer=tiny_tokenizer())
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(LitPeftError, match="prefix_tuning: attention implementation 'flex_attention'"):
        use_peft_attention(model, option="prefix_tuning")


def test_architecture_without_the_interface_is_named():
    config = AutoConfig.for_model("bloom", vocab_size=64, hidden_size=32, n_head=4, n_layer=2)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(LitPeftError, match="BloomForCausalLM does not use transformers' attention interface"):
        use_peft_attention(model)


def test_qwen3_prompt_keys_use_its_key_norm():
    """Qwen3 normalizes keys per head (k_norm) inside its key map: the prompt keys get the same map."""
    config = AutoConfig.for_model(
        "qwen3",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    torch.manual_seed(0)
    attn = AutoModelForCausalLM.from_config(config).model.layers[0].self_attn
    with torch.no_grad():
        attn.k_norm.weight.uniform_(0.5, 2.0)
        prompt = torch.randn(3, 64)
        k, v = prompt_key_value(attn, prompt)
        # Qwen3Attention's own key computation: k_norm(k_proj(x).view(..., heads, head_dim))
        expected = attn.k_norm(attn.k_proj(prompt).view(3, 2, 16)).transpose(0, 1)
    torch.testing.assert_close(k, expected)
    torch.testing.assert_close(v, attn.v_proj(prompt).view(3, 2, 16).transpose(0, 1))


def test_cpu_attention_runs_in_fp32_and_matches_the_formula() -> None:
    """bf16 inputs on the CPU: softmax(q k^T * scaling + causal mask) v, computed here in float64."""

    class Attn(torch.nn.Module):
        num_key_value_groups, is_causal = 1, True

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = cpu_sdpa_attention(Attn(), q, k, v, None, scaling=0.3)
    scores = (q.double() @ k.double().transpose(-1, -2)) * 0.3
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    reference = (scores.softmax(-1) @ v.double()).transpose(1, 2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference, rtol=1e-2, atol=1e-2)


def kernel_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.dtype, bool]]:
    """Record (query dtype, autocast on) at every call of torch's sdpa kernel itself."""
    seen: list[tuple[torch.dtype, bool]] = []
    kernel = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        seen.append((query.dtype, torch.is_autocast_enabled("cpu")))
        return kernel(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cpu_attention_kernel_runs_in_fp32_under_autocast(arch, monkeypatch):
    """Under bf16-mixed, RoPE's fp32 cos/sin hand Llama's attention fp32 queries (GPT-2's stay bf16); in
    both cases the kernel itself must run in fp32 with autocast off, forward and backward."""
    seen = kernel_spy(monkeypatch)
    model = load_model(f"tiny:{arch}", tokenizer=tiny_tokenizer())
    model.set_attn_implementation(attention.CPU_SDPA)
    model.requires_grad_(True)
    ids = encode("right")["input_ids"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    logits.float().sum().backward()
    assert len(seen) == model.config.num_hidden_layers
    assert set(seen) == {(torch.float32, False)}
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_prefix_attention_under_bf16_on_the_cpu_runs_in_fp32(monkeypatch):
    """The prefix methods' wrapper takes the same fp32-on-CPU path as plain models (bf16 in, bf16 out)."""
    seen = kernel_spy(monkeypatch)
    model = both_methods("llama", "sdpa")
    enc = encode("left")
    with torch.no_grad():
        reference = model(**enc).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(**enc).logits
    assert seen and set(seen) == {(torch.float32, False)}
    keep = enc["attention_mask"].bool()
    torch.testing.assert_close(low[keep].float(), reference[keep], atol=0.1, rtol=0.05)


def test_gpt_neox_prompt_keys_are_its_attention_keys():
    """GPT-NeoX fuses q/k/v per head (``query_key_value``, no ``head_dim`` attribute): the prompt keys and
    values are the ones its attention caches for the same hidden states (rotation off: cos 1, sin 0)."""
    attn = attention_modules(load_model("tiny:gpt_neox"))[1]
    prompt = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    cache = DynamicCache()
    rope = (torch.ones(1, 3, 16), torch.zeros(1, 3, 16))  # head_size 16 = hidden 64 / 4 heads
    with torch.no_grad():
        attn(prompt[None], attention_mask=None, layer_past=cache, position_embeddings=rope)
        k, v = prompt_key_value(attn, prompt)
    assert k.shape == (4, 3, 16)
    torch.testing.assert_close(k, cache.layers[1].keys[0])
    torch.testing.assert_close(v, cache.layers[1].values[0])
