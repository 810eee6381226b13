"""(IA)^3: zero-change start, parity with Hugging Face peft (count, logits, export), merge."""

from __future__ import annotations

import copy

import method_helpers as helpers
import pytest
import torch
from adapter_helpers import logits, make_adapter, token_ids
from peft import IA3Config, PeftModel, get_peft_model

from litpeft.adapter_dir import load_adapter
from litpeft.errors import LitPeftError
from litpeft.methods import IA3, IA3Linear, method_from_config
from litpeft.models import load_model

#: family -> peft's own IA3 defaults for it (peft's TRANSFORMERS_MODELS_TO_IA3_*_MAPPING)
PEFT_DEFAULTS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def randomized(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Every ``l`` moved off 1 (a zero-change adapter would pass any equality test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, IA3Linear):
                m.ia3_l.add_(torch.randn(m.ia3_l.shape, generator=g) * 0.3)
    return model.eval()


def peft_with_our_weights(base: torch.nn.Module, ours: torch.nn.Module, config: IA3Config) -> PeftModel:
    theirs = get_peft_model(copy.deepcopy(base), config).eval()
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                params["base_model.model." + name.replace("ia3_l", "ia3_l.default")].copy_(p)
    return theirs


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_step0_is_the_base_and_disabled_is_the_base(arch: str) -> None:
    base = load_model(f"tiny:{arch}")
    helpers.assert_starts_as_base_and_disables_to_base(base, IA3(), randomize=randomized)


@pytest.mark.parametrize("arch", list(PEFT_DEFAULTS))
def test_trainable_count_and_logits_equal_peft(arch: str) -> None:
    """peft's defaults for the family as our config: the same trainable count, and with the same vectors
    the same logits (fp32, 1e-5); keys and values scale outputs, the FFN scales its input."""
    targets, feedforward = PEFT_DEFAULTS[arch]
    base = load_model(f"tiny:{arch}")
    ours = randomized(IA3(targets, feedforward).apply(copy.deepcopy(base)))
    config = IA3Config(target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=arch == "gpt2")
    theirs = peft_with_our_weights(base, ours, config)
    assert count(ours) == count(theirs) > 0
    x = token_ids()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "phi3", "gpt_neox"])
def test_default_targets_count_equals_peft_with_the_exported_config(arch: str) -> None:
    """The default (keys, values, FFN down projection of every family): peft, given the config
    ``to_peft`` writes, wraps the same layers with the same shapes."""
    base = load_model(f"tiny:{arch}")
    method = IA3()
    ours = method.apply(copy.deepcopy(base))
    config, _ = method.to_peft(ours, method.adapter_state_dict(ours))
    keys = ("target_modules", "feedforward_modules", "fan_in_fan_out")
    theirs = get_peft_model(copy.deepcopy(base), IA3Config(**{k: config[k] for k in keys}))
    assert count(ours) == count(theirs) > 0
    # the hand count: l_k, l_v (out x 1 each) and l_ff (1 x FFN width) per layer
    c = base.config
    if arch in ("llama", "qwen2"):
        kv = 2 * c.num_key_value_heads * c.hidden_size // c.num_attention_heads
        assert count(ours) == c.num_hidden_layers * (kv + c.intermediate_size)


@pytest.mark.parametrize(
    "spec, make",
    [
        ("tiny:llama", lambda: IA3()),
        ("tiny:gpt2", lambda: IA3()),
        (
            "tiny:qwen2",
            lambda: IA3(target_modules=r".*\.(q_proj|down_proj)", feedforward_modules=r".*down_proj"),
        ),
    ],
    ids=["llama", "gpt2-conv1d", "qwen2-regex"],
)
def test_litpeft_export_round_trips_through_peft(tmp_path, spec: str, make) -> None:
    helpers.assert_peft_loads_the_export(tmp_path, spec, make())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_merged_equals_unmerged(arch: str) -> None:
    """Rows (and the bias: Qwen2's k/v, GPT-2's c_attn) or columns (the FFN) of W scaled by l: the merged
    plain model computes the adapted one's logits; its weights are the architecture's own."""
    merged = helpers.merged_keeping_logits(randomized(IA3().apply(load_model(f"tiny:{arch}"))), IA3())
    assert not any(isinstance(m, IA3Linear) for m in merged.modules())


def test_config_errors_are_one_line() -> None:
    with pytest.raises(ValueError, match=r"feedforward_modules: \['fc2'\] is not allowed; a subset of"):
        IA3(target_modules=["k_proj"], feedforward_modules=["fc2"])
    with pytest.raises(LitPeftError, match="target_modules: .* matched no layer"):
        IA3(target_modules=["nope"]).apply(load_model("tiny:llama"))
    method = IA3(target_modules=["v_proj"], feedforward_modules=[])
    assert method_from_config(method.config()).config() == method.config()


def test_merge_of_an_adapter_trained_on_an_nf4_base(tmp_path) -> None:
    """``litpeft merge`` of an adapter trained on a quantized GPT-2: the adapted layers and the ones
    (IA)^3 left alone (attn.c_proj, mlp.c_fc) come back as plain Conv1D layers that ``from_pretrained``
    loads, with the logits of the quantized model + adapter."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from litpeft.commands import merge as merge_command

    adapter = make_adapter(tmp_path / "adapter", "tiny:gpt2", IA3(), quantize="nf4")
    merge_command(str(adapter), str(tmp_path / "merged"))
    ours, _, _, _ = load_adapter(adapter)
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    block = merged.transformer.h[0]
    assert all(isinstance(m, Conv1D) for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc))
    x = token_ids()
    torch.testing.assert_close(logits(merged.eval(), x), logits(ours, x), atol=1e-4, rtol=1e-4)
