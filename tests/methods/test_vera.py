"""VeRA: zero-change start, parity with Hugging Face peft (count, shared matrices, logits, export), merge."""

from __future__ import annotations

import copy

import pytest
import torch
from adapter_helpers import logits, make_adapter, token_ids
from peft import PeftModel, VeraConfig, get_peft_model, get_peft_model_state_dict

from litpeft.adapter_dir import load_adapter
from litpeft.commands import export_adapter
from litpeft.errors import LitPeftError
from litpeft.export import merge
from litpeft.methods import VeRA, VeRALinear, adapters_disabled, method_from_config
from litpeft.models import load_model


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def randomized(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_step0_is_the_base_and_disabled_is_the_base(arch: str) -> None:
    base = load_model(f"tiny:{arch}")
    model = VeRA(r=8).apply(copy.deepcopy(base)).eval()
    x = token_ids()
    assert torch.equal(logits(model, x), logits(base, x))
    randomized(model)
    assert not torch.allclose(logits(model, x), logits(base, x), atol=1e-3)
    with adapters_disabled(model):
        assert torch.equal(logits(model, x), logits(base, x))


@pytest.mark.parametrize(
    "arch, targets",
    [("llama", "all-linear"), ("qwen2", ["q_proj", "v_proj"]), ("gpt2", "all-linear")],
)
def test_count_projections_and_logits_equal_peft(arch: str, targets: str | list[str]) -> None:
    """The same trainable count (out + r per layer), the same shared random matrices from the same key,
    and with the same vectors the same logits (fp32, 1e-5)."""
    base = load_model(f"tiny:{arch}")
    ours = randomized(VeRA(r=8, target_modules=targets, projection_prng_key=3).apply(copy.deepcopy(base)))
    config = VeraConfig(r=8, target_modules=targets, projection_prng_key=3, fan_in_fan_out=arch == "gpt2")
    theirs = get_peft_model(copy.deepcopy(base), config).eval()
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                params[f"base_model.model.{name}.default"].copy_(p)
    layers = [m for m in ours.modules() if isinstance(m, VeRALinear)]
    assert count(ours) == count(theirs) == sum(m.out_features + 8 for m in layers)
    saved = get_peft_model_state_dict(theirs)
    projections = layers[0].projections
    assert torch.equal(projections.vera_A, saved["base_model.vera_A"])
    assert torch.equal(projections.vera_B, saved["base_model.vera_B"])
    x = token_ids()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "spec, make",
    [("tiny:llama", lambda: VeRA(r=8)), ("tiny:gpt2", lambda: VeRA(r=8, target_modules=["c_attn"]))],
    ids=["llama", "gpt2-conv1d"],
)
def test_litpeft_export_round_trips_through_peft(tmp_path, spec: str, make) -> None:
    adapter = make_adapter(tmp_path / "adapter", spec, make())
    export_adapter(str(adapter), str(tmp_path / "peft"))
    ours, _, _, _ = load_adapter(adapter)  # the matrices rebuilt from the key: the adapter holds only b, d
    base = load_model(spec)
    x = token_ids()
    base_logits = logits(base, x)
    theirs = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    expected = logits(ours, x)
    assert not torch.allclose(expected, base_logits, atol=1e-3)
    torch.testing.assert_close(logits(theirs, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_equals_unmerged(arch: str) -> None:
    model = randomized(VeRA(r=8).apply(load_model(f"tiny:{arch}")))
    x = token_ids()
    before = logits(model, x)
    merged = merge(model, VeRA(r=8))  # also checks: no VeRA layer or matrix left, the architecture's keys
    torch.testing.assert_close(logits(merged, x), before, rtol=1e-5, atol=1e-5)


def test_config_errors_are_one_line() -> None:
    with pytest.raises(ValueError, match="r: 0 is not allowed; VeRA's rank must be a positive integer"):
        VeRA(r=0)
    with pytest.raises(LitPeftError, match="target_modules: .* matched no layer"):
        VeRA(target_modules=["nope"]).apply(load_model("tiny:llama"))
    method = VeRA(r=4, target_modules=["q_proj"], projection_prng_key=7)
    assert method_from_config(method.config()).config() == method.config()
