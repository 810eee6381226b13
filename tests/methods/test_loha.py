"""LoHa: zero-change start, parity with Hugging Face peft (init, count, logits, dropout masks, export),
the factored backward, merge (also on an nf4 base), one-line errors."""

from __future__ import annotations

import copy

import method_helpers as helpers
import pytest
import torch
from adapter_helpers import logits, make_adapter, token_ids
from peft import LoHaConfig, get_peft_model
from transformers.pytorch_utils import Conv1D

from litpeft import PeftLM
from litpeft.commands import export_adapter
from litpeft.errors import LitPeftError
from litpeft.methods import LoHa, LoHaLinear, method_from_config
from litpeft.methods.loha import HadamardDelta
from litpeft.models import load_model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_step0_is_the_base_and_disabled_is_the_base(arch: str) -> None:
    helpers.assert_starts_as_base_and_disables_to_base(load_model(f"tiny:{arch}"), LoHa(r=4))


@pytest.mark.parametrize(
    "arch, targets, r",
    [("llama", "all-linear", 8), ("qwen2", ["q_proj", "v_proj"], 4), ("phi3", "all-linear", 4)],
)
def test_init_count_and_logits_equal_peft(arch: str, targets: str | list[str], r: int) -> None:
    """From the same seed the same initial factors (peft's scheme: three Kaiming-uniform, w2_b zero),
    the same trainable count (2 r (out + in) per layer), and with the same factors the same logits
    (r 8 on the 64-wide tiny layers forms Delta W, r 4 takes the rank-r^2 product)."""
    base = load_model(f"tiny:{arch}")
    torch.manual_seed(5)
    ours = LoHa(r=r, alpha=8, target_modules=targets).apply(copy.deepcopy(base))
    torch.manual_seed(5)
    theirs = get_peft_model(copy.deepcopy(base), LoHaConfig(r=r, alpha=8, target_modules=targets))
    helpers.assert_same_trainables_as_peft(ours, theirs)
    layers = [m for m in ours.modules() if isinstance(m, LoHaLinear)]
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == sum(
        2 * r * (m.out_features + m.in_features) for m in layers
    )
    helpers.randomized(ours)
    theirs = helpers.peft_twin(base, ours, LoHaConfig(r=r, alpha=8, target_modules=targets)).eval()
    x = token_ids()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), rtol=1e-5, atol=1e-5)


def test_rank_and_module_dropout_draw_peft_masks() -> None:
    """In training, the same seed gives peft's module-skip and row masks: the same logits."""
    base = load_model("tiny:llama")
    ours = helpers.randomized(LoHa(r=4, rank_dropout=0.5, module_dropout=0.3).apply(copy.deepcopy(base)))
    config = LoHaConfig(r=4, rank_dropout=0.5, module_dropout=0.3, target_modules="all-linear")
    helpers.assert_training_logits_equal_peft(ours, helpers.peft_twin(base, ours, config))


def test_factored_backward_equals_autograd() -> None:
    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(s, generator=g, dtype=torch.float64) for s in ((6, 3), (3, 5), (6, 3), (3, 5))]
    factors = [f.requires_grad_() for f in factors]
    torch.autograd.gradcheck(lambda *f: HadamardDelta.apply(*f, 0.7), factors)
    w1a, w1b, w2a, w2b = factors
    assert torch.equal(HadamardDelta.apply(*factors, 0.7), (w1a @ w1b) * (w2a @ w2b) * 0.7)


def test_litpeft_export_round_trips_through_peft(tmp_path) -> None:
    method = LoHa(r=4, target_modules=["q_proj", "down_proj"])
    helpers.assert_peft_loads_the_export(tmp_path, "tiny:llama", method)


def test_gpt2_conv1d_peft_export_is_refused_with_one_line(tmp_path) -> None:
    adapter = make_adapter(tmp_path / "adapter", "tiny:gpt2", LoHa(r=4))
    with pytest.raises(LitPeftError, match="peft's LoHa wraps nn.Linear layers only, not GPT-2's Conv1D"):
        export_adapter(str(adapter), str(tmp_path / "peft"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_equals_unmerged(arch: str) -> None:
    model = helpers.randomized(LoHa(r=4).apply(load_model(f"tiny:{arch}")))
    merged = helpers.merged_keeping_logits(model, LoHa(r=4))
    assert not any(isinstance(m, LoHaLinear) for m in merged.modules())


def test_config_errors_are_one_line() -> None:
    with pytest.raises(ValueError, match="r: 0 is not allowed; LoHa's rank must be a positive integer"):
        LoHa(r=0)
    with pytest.raises(ValueError, match="rank_dropout: 1.0 is not allowed; a dropout probability is in"):
        LoHa(rank_dropout=1.0)
    with pytest.raises(LitPeftError, match="target_modules: .* matched no layer"):
        LoHa(target_modules=["nope"]).apply(load_model("tiny:llama"))
    method = LoHa(r=4, alpha=2.0, module_dropout=0.1, target_modules=["q_proj"])
    assert method_from_config(method.config()).config() == method.config()


def test_merge_on_an_nf4_base_gives_plain_layers_of_the_same_outputs() -> None:
    """A quantized base cannot take Delta W in place: merge replaces it by a plain layer of the original
    kind (GPT-2: Conv1D) holding the dequantized weight + Delta W (shared by LoHa and LoKr)."""
    lm = PeftLM(model="tiny:gpt2", method=LoHa(r=2), quantize="nf4")
    lm.configure_model()
    merged = helpers.merged_keeping_logits(helpers.randomized(lm.model), LoHa(r=2))
    assert type(merged.get_submodule("transformer.h.0.attn.c_attn")) is Conv1D
