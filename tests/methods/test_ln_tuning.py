"""LayerNorm tuning: zero-change start, parity with Hugging Face peft (count, logits, export), merge."""

from __future__ import annotations

import copy

import method_helpers as helpers
import pytest
import torch
from adapter_helpers import logits, token_ids
from peft import LNTuningConfig, get_peft_model

from litpeft.errors import LitPeftError
from litpeft.export import merge
from litpeft.methods import LNTuning, method_from_config
from litpeft.models import load_model

#: family -> its norms' short names (the hand list peft is given)
NORMS = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "qwen2": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "qwen3": ["input_layernorm", "post_attention_layernorm", "norm", "q_norm", "k_norm"],
}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def randomized(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_step0_is_the_base_and_disabled_is_the_base(arch: str) -> None:
    base = load_model(f"tiny:{arch}")
    helpers.assert_starts_as_base_and_disables_to_base(base, LNTuning(), randomize=randomized)


@pytest.mark.parametrize("arch", list(NORMS))
def test_trainable_count_and_logits_equal_peft(arch: str) -> None:
    """The default (every norm) trains what peft trains when given the family's norms by hand, and with the
    same values computes the same logits (fp32, 1e-5)."""
    base = load_model(f"tiny:{arch}")
    ours = randomized(LNTuning().apply(copy.deepcopy(base)))
    theirs = get_peft_model(copy.deepcopy(base), LNTuningConfig(target_modules=NORMS[arch])).eval()
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                key = name.replace(".ln_tuning_layers.", ".ln_tuning_layers.default.")
                params["base_model.model." + key].copy_(p)
    assert count(ours) == count(theirs) > 0
    # the hand count: RMSNorm has a gain per feature, GPT-2's LayerNorm a gain and a bias
    c = base.config
    width = {"gpt2": 2 * c.hidden_size}.get(arch, c.hidden_size)
    head_norms = 2 * c.hidden_size // c.num_attention_heads if arch == "qwen3" else 0
    assert count(ours) == c.num_hidden_layers * (2 * width + head_norms) + width
    x = token_ids()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "spec, make",
    [
        ("tiny:llama", lambda: LNTuning()),
        ("tiny:gpt2", lambda: LNTuning()),
        ("tiny:qwen2", lambda: LNTuning(target_modules=r"model\.layers\.1\..*layernorm")),
    ],
    ids=["llama", "gpt2-layernorm-bias", "qwen2-regex"],
)
def test_litpeft_export_round_trips_through_peft(tmp_path, spec: str, make) -> None:
    helpers.assert_peft_loads_the_export(tmp_path, spec, make())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_merged_equals_unmerged(arch: str) -> None:
    model = randomized(LNTuning().apply(load_model(f"tiny:{arch}")))
    x = token_ids()
    before = logits(model, x)
    merged = merge(model, LNTuning())
    assert not any(p.requires_grad for p in merged.parameters())
    assert torch.equal(logits(merged, x), before)  # the same norms, now plain


def test_config_errors_are_one_line() -> None:
    with pytest.raises(
        LitPeftError, match=r"target_modules: \['q_proj'\] is not allowed; names that matched no"
    ):
        LNTuning(target_modules=["q_proj"]).apply(load_model("tiny:llama"))  # not a norm
    method = LNTuning(target_modules=["norm"])
    assert method_from_config(method.config()).config() == method.config()
    model = method.apply(load_model("tiny:llama"))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "model.norm.ln_tuning_layers.weight"
    ]
