"""LoKr: peft's factorization rule, zero-change start, parity with Hugging Face peft (init, shapes, count,
logits, dropout masks, export), merge, one-line errors."""

from __future__ import annotations

import copy

import method_helpers as helpers
import pytest
import torch
from adapter_helpers import logits, make_adapter, token_ids
from peft import LoKrConfig, get_peft_model
from peft.tuners.lokr.layer import factorization as peft_factorization

from litpeft.commands import export_adapter
from litpeft.errors import LitPeftError
from litpeft.methods import LoKr, LoKrLinear, method_from_config
from litpeft.methods.lokr import factorization
from litpeft.models import load_model


def test_factorization_is_peft_rule() -> None:
    for factor in (-1, 1, 2, 3, 4, 8, 16, 100):
        for dimension in [*range(1, 300), 896, 1536, 4864, 11008, 14336]:
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (
                dimension,
                factor,
            )
    assert factorization(4096) == (64, 64) and factorization(127) == (1, 127)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_step0_is_the_base_and_disabled_is_the_base(arch: str) -> None:
    method = LoKr(r=2, decompose_both=True)
    helpers.assert_starts_as_base_and_disables_to_base(load_model(f"tiny:{arch}"), method)


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        ("llama", {"r": 8}),  # full W1 and W2 (8 x 8 factors, r >= 8 / 2)
        ("llama", {"r": 2, "decompose_both": True}),  # W1 = W1a W1b and W2 = W2a W2b
        ("qwen2", {"r": 2, "decompose_factor": 4, "target_modules": ["q_proj", "down_proj"]}),
        ("phi3", {"r": 1, "alpha": 3.0}),
    ],
    ids=["full", "decompose-both", "factor-4", "phi3"],
)
def test_init_shapes_count_and_logits_equal_peft(arch: str, kwargs: dict) -> None:
    """From the same seed the same factors, shapes and names (peft's init: W1 or W1a zero, the rest
    Kaiming-uniform), and with the same factors the same logits."""
    base = load_model(f"tiny:{arch}")
    config = LoKrConfig(**{"target_modules": "all-linear", **kwargs})
    torch.manual_seed(5)
    ours = LoKr(**kwargs).apply(copy.deepcopy(base))
    torch.manual_seed(5)
    theirs = get_peft_model(copy.deepcopy(base), config)
    helpers.assert_same_trainables_as_peft(ours, theirs)
    if kwargs.get("decompose_both"):
        mine = [n for n, p in ours.named_parameters() if p.requires_grad]
        assert any(n.endswith("lokr_w1_a") for n in mine) and any(n.endswith("lokr_w2_b") for n in mine)
    helpers.randomized(ours)
    theirs = helpers.peft_twin(base, ours, config).eval()
    x = token_ids()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [False, True])
def test_rank_and_module_dropout_draw_peft_masks(scale: bool) -> None:
    base = load_model("tiny:llama")
    kwargs = {"r": 2, "rank_dropout": 0.5, "module_dropout": 0.3, "rank_dropout_scale": scale}
    ours = helpers.randomized(LoKr(**kwargs).apply(copy.deepcopy(base)))
    theirs = helpers.peft_twin(base, ours, LoKrConfig(target_modules="all-linear", **kwargs))
    helpers.assert_training_logits_equal_peft(ours, theirs)


def test_litpeft_export_round_trips_through_peft(tmp_path) -> None:
    method = LoKr(
        r=2, alpha=4.0, decompose_both=True, decompose_factor=4, target_modules=["k_proj", "up_proj"]
    )
    helpers.assert_peft_loads_the_export(tmp_path, "tiny:llama", method)


def test_gpt2_conv1d_peft_export_is_refused(tmp_path) -> None:
    adapter = make_adapter(tmp_path / "adapter", "tiny:gpt2", LoKr(r=2))
    with pytest.raises(LitPeftError, match="peft's LoKr wraps nn.Linear layers only, not GPT-2's Conv1D"):
        export_adapter(str(adapter), str(tmp_path / "peft"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_equals_unmerged(arch: str) -> None:
    merged = helpers.merged_keeping_logits(
        helpers.randomized(LoKr(r=2).apply(load_model(f"tiny:{arch}"))), LoKr(r=2)
    )
    assert not any(isinstance(m, LoKrLinear) for m in merged.modules())


def test_config_errors_are_one_line() -> None:
    with pytest.raises(ValueError, match="r: -1 is not allowed; LoKr's rank must be a positive integer"):
        LoKr(r=-1)
    with pytest.raises(ValueError, match="decompose_factor: 0 is not allowed; -1 .* or a positive integer"):
        LoKr(decompose_factor=0)
    with pytest.raises(ValueError, match="module_dropout: -0.1 is not allowed; a dropout probability"):
        LoKr(module_dropout=-0.1)
    method = LoKr(
        r=4, decompose_both=True, decompose_factor=8, rank_dropout_scale=True, target_modules=["q_proj"]
    )
    assert method_from_config(method.config()).config() == method.config()
