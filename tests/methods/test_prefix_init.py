"""Prefix tuning / P-tuning v2 ``init_text``: the prefix starts at the frozen model's own past keys/values
of a text (Li & Liang 2021, sec. 7.2), checked against Hugging Face's own KV cache and against the base
model reading the text before the input."""

from __future__ import annotations

import method_helpers as helpers
import pytest
import torch

from litpeft.errors import LitPeftError
from litpeft.methods import PrefixTuning, PTuningV2
from litpeft.methods.layout import attention_modules
from litpeft.methods.prefix import PREFIX
from litpeft.models import tiny_tokenizer

TEXT = "Hi!"  # 3 tokens of the tiny (character-level) tokenizer


def text_ids(n: int) -> list[int]:
    """``TEXT``'s tokens (no special tokens) repeated or truncated to ``n``."""
    ids = tiny_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]
    return (ids * n)[:n]


def build(arch: str, n: int) -> torch.nn.Module:
    return helpers.build(arch, PTuningV2(n, init_text=TEXT, tokenizer=f"tiny:{arch}")).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "gpt_neox"])
@pytest.mark.parametrize("n", [2, 5])  # truncated, repeated
def test_prefix_starts_at_the_base_models_past_keys_values(arch, n):
    """At init each layer's prefix keys/values are what the base model caches for the text (HF's cache)."""
    assert len(tiny_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]) == 3
    model = build(arch, n)
    with torch.no_grad():
        cache = helpers.base_model(arch)(
            input_ids=torch.tensor([text_ids(n)]), use_cache=True
        ).past_key_values
    for m in attention_modules(model):
        prefix = getattr(m, PREFIX)
        assert prefix.key.dtype == torch.float32 and prefix.key.requires_grad
        torch.testing.assert_close(prefix.key, cache.layers[m.layer_idx].keys[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(prefix.value, cache.layers[m.layer_idx].values[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "gemma3", "gpt_neox"])
def test_model_with_the_prefix_is_the_base_model_reading_the_text_first(arch):
    """The oracle: the base model fed the text then the input gives the input's logits; the input is
    long enough that Gemma's sliding window (8) drops the prefix for the last tokens."""
    n = 5
    model = build(arch, n)
    base = helpers.base_model(arch)
    x = torch.randint(3, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(input_ids=x).logits
        theirs = base(input_ids=torch.cat([torch.tensor([text_ids(n)] * 2), x], dim=1)).logits[:, n:]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_the_reparameterization_cannot_start_at_a_text():
    with pytest.raises(LitPeftError, match="set prefix_projection: false") as info:
        PrefixTuning(init_text=TEXT)
    assert "\n" not in str(info.value)
    PrefixTuning(prefix_projection=False, init_text=TEXT)  # direct prefix tuning can
    with pytest.raises(LitPeftError, match="init_text"):
        PTuningV2(init_text="")


def test_a_base_with_16_bit_linears_reads_the_text_under_autocast():
    """Under bf16-mixed PeftLM loads the frozen linears in bf16 before the method is applied (the rest
    fp32): the text is read under autocast, as training will (a plain call failed with a dtype mismatch)."""
    n, arch = 5, "llama"
    exact = build(arch, n)
    base = helpers.base_model(arch)
    for m in base.modules():
        if isinstance(m, torch.nn.Linear):
            m.to(torch.bfloat16)
    torch.manual_seed(0)
    PTuningV2(n, init_text=TEXT, tokenizer=f"tiny:{arch}").apply(base)
    for ours, theirs in zip(attention_modules(base), attention_modules(exact), strict=True):
        key = getattr(ours, PREFIX).key
        assert key.dtype == torch.float32
        torch.testing.assert_close(key, getattr(theirs, PREFIX).key, atol=0.05, rtol=0.05)  # bf16 rounding
