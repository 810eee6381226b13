"""VeRA: zero-change start, parity with Hugging Face peft (count, shared matrices, logits, export), merge."""

from __future__ import annotations

import copy

import method_helpers as helpers
import pytest
import torch
from adapter_helpers import logits, token_ids
from peft import VeraConfig, get_peft_model_state_dict

from litpeft.errors import LitPeftError
from litpeft.methods import VeRA, VeRALinear, method_from_config
from litpeft.models import load_model


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_step0_is_the_base_and_disabled_is_the_base(arch: str) -> None:
    helpers.assert_starts_as_base_and_disables_to_base(load_model(f"tiny:{arch}"), VeRA(r=8))


@pytest.mark.parametrize(
    "arch, targets",
    [("llama", "all-linear"), ("qwen2", ["q_proj", "v_proj"]), ("gpt2", "all-linear")],
)
def test_count_projections_and_logits_equal_peft(arch: str, targets: str | list[str]) -> None:
    """The same trainable count (out + r per layer), the same shared random matrices from the same key,
    and with the same vectors the same logits (fp32, 1e-5)."""
    base = load_model(f"tiny:{arch}")
    method = VeRA(r=8, target_modules=targets, projection_prng_key=3)
    ours = helpers.randomized(method.apply(copy.deepcopy(base)))
    config = VeraConfig(r=8, target_modules=targets, projection_prng_key=3, fan_in_fan_out=arch == "gpt2")
    theirs = helpers.peft_twin(base, ours, config).eval()
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
    # litpeft's load rebuilds the matrices from the key: the adapter holds only b and d
    helpers.assert_peft_loads_the_export(tmp_path, spec, make())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_equals_unmerged(arch: str) -> None:
    model = helpers.randomized(VeRA(r=8).apply(load_model(f"tiny:{arch}")))
    helpers.merged_keeping_logits(model, VeRA(r=8))  # merge checks: no VeRA layer or matrix left


def test_config_errors_are_one_line() -> None:
    with pytest.raises(ValueError, match="r: 0 is not allowed; VeRA's rank must be a positive integer"):
        VeRA(r=0)
    with pytest.raises(LitPeftError, match="target_modules: .* matched no layer"):
        VeRA(target_modules=["nope"]).apply(load_model("tiny:llama"))
    method = VeRA(r=4, target_modules=["q_proj"], projection_prng_key=7)
    assert method_from_config(method.config()).config() == method.config()
