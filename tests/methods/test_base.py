"""The shared pieces of litpeft/methods/base.py: the CPU dropout used by LoRA and the prefix methods, the
speed switches, the declared capabilities and the method registry."""

from __future__ import annotations

import math

import pytest
import torch

from litpeft.errors import LitPeftError
from litpeft.export import check_exportable, check_mergeable
from litpeft.methods import (
    HoulsbyAdapter,
    LlamaAdapter,
    LlamaAdapterV2,
    LoRA,
    LoRALinear,
    PeftMethod,
    PTuning,
    PTuningV2,
    method_from_config,
)
from litpeft.methods.base import Dropout
from litpeft.speedups import SPEEDUPS

N = 1_000_000


def effective(p: float) -> float:
    """The drop probability the 16-bit masks realize: p rounded to a multiple of 1/65536."""
    return round(p * 65536) / 65536


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drops_a_fraction_p_and_keeps_the_mean(p: float, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    out = Dropout(p)(torch.ones(N, dtype=dtype))
    dropped = (out == 0).double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / N)  # 5 binomial standard deviations
    kept = out[out != 0].double()
    scale = torch.tensor(1 / (1 - effective(p)), dtype=dtype).item()  # the scale, rounded as the data
    assert torch.equal(kept, torch.full_like(kept, scale))
    if dtype == torch.float32:  # unbiased: E[out] = x
        assert abs(out.double().mean().item() - 1) < 5 * math.sqrt(p / (1 - p) / N)


def test_neighbouring_elements_are_independent() -> None:
    """Each random word feeds four neighbouring elements: their masks must not be correlated."""
    torch.manual_seed(0)
    dropped = Dropout(0.5)(torch.ones(N)) == 0
    for lag in (1, 2, 3, 4):
        both = (dropped[:-lag] & dropped[lag:]).double().mean().item()
        assert abs(both - 0.25) < 5 * math.sqrt(0.25 * 0.75 / N), lag


def test_gradient_uses_the_forward_mask() -> None:
    torch.manual_seed(0)
    x = (torch.rand(64, 33) + 0.5).requires_grad_(True)  # no zeros: a dropped element shows as 0
    out = Dropout(0.3)(x)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, out.detach() / x.detach())


def test_seeded_fresh_per_call_and_identity_in_eval() -> None:
    dropout, x = Dropout(0.2), torch.ones(4096)
    torch.manual_seed(1)
    first, second = dropout(x), dropout(x)
    torch.manual_seed(1)
    assert torch.equal(dropout(x), first)
    assert not torch.equal(first, second)
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(Dropout(0.0)(x), x)


# -- speed switches (litpeft.speedups): each changes the path taken, not the result -------------------------
def test_fast_dropout_switch_takes_the_plain_path(monkeypatch) -> None:
    x = torch.ones(4096)
    monkeypatch.setattr(SPEEDUPS, "fast_dropout", False)
    torch.manual_seed(3)
    plain = Dropout(0.25)(x)
    torch.manual_seed(3)
    assert torch.equal(plain, torch.nn.Dropout(0.25)(x))  # exactly nn.Dropout's draws
    monkeypatch.setattr(SPEEDUPS, "fast_dropout", True)
    torch.manual_seed(3)
    fast = Dropout(0.25)(x)
    assert not torch.equal(fast, plain)  # the other path (other random draws) ...
    for out in (fast, plain):  # ... with the same distribution: dropped or scaled by 1/(1-p)
        kept = out[out != 0]
        torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.75))


@pytest.mark.parametrize("autocast", [False, True])
def test_lora_forward_switch_gives_the_same_output(monkeypatch, autocast: bool) -> None:
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(32, 24), r=4, alpha=8.0)  # scaling 2
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 32)
    seen: dict[str, torch.Tensor] = {}
    layer.lora_A.register_forward_hook(lambda m, args, out: seen.update(a=out))
    layer.lora_B.register_forward_pre_hook(lambda m, args: seen.update(b=args[0]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fast = layer(x)
        assert torch.equal(seen["b"], seen["a"] * 2)  # optimized: scaling on the rank-r activations
        monkeypatch.setattr(SPEEDUPS, "lora_forward", False)
        old = layer(x)
        assert torch.equal(seen["b"], seen["a"])  # the pre-optimization form: scaling on the output
    tol = 2e-2 if autocast else 1e-5
    torch.testing.assert_close(fast.float(), old.float(), rtol=tol, atol=tol)


# -- declared capabilities and the method registry ----------------------------------------------------------
def test_capabilities_are_declared_and_checked_before_loading() -> None:
    assert LoRA.mergeable and LoRA.exportable_to_peft
    assert not HoulsbyAdapter.mergeable and not HoulsbyAdapter.exportable_to_peft
    assert (
        LlamaAdapter.exportable_to_peft and not LlamaAdapterV2.exportable_to_peft and LlamaAdapterV2.mergeable
    )
    assert PTuning().peft_refusal() is None
    split = PTuning(num_virtual_tokens=4, placement="split", num_before=1, split_marker="x")
    with pytest.raises(LitPeftError, match="placement='split' has no peft equivalent"):
        check_exportable(split)
    with pytest.raises(LitPeftError, match="peft issue #244"):
        check_exportable(HoulsbyAdapter())
    with pytest.raises(LitPeftError, match="llama_adapter_v2 has no Hugging Face peft equivalent"):
        check_exportable(LlamaAdapterV2())
    with pytest.raises(LitPeftError, match="nonlinearity"):
        check_mergeable(HoulsbyAdapter())
    check_mergeable(LoRA())
    check_exportable(LoRA())


def test_a_method_that_overrides_to_peft_is_exportable_without_declaring_it() -> None:
    class Mine(PeftMethod):
        def to_peft(self, model, state):  # noqa: ANN001, ANN202
            return {}, {}

    assert Mine.exportable_to_peft and Mine().peft_refusal() is None
    assert not PeftMethod.exportable_to_peft


def test_method_from_config_resolves_short_names_and_import_paths() -> None:
    assert isinstance(method_from_config({"class_path": "lora", "init_args": {"r": 2}}), LoRA)
    assert type(method_from_config({"class_path": "litpeft.methods.p_tuning_v2.PTuningV2"})) is PTuningV2
    # adapter.yaml files written before P-tuning v2 had a file of its own still load, with one warning
    old_path = r"litpeft\.methods\.prefix\.PTuningV2 moved to litpeft\.methods\.p_tuning_v2\.PTuningV2"
    with pytest.warns(FutureWarning, match=old_path):
        assert type(method_from_config({"class_path": "litpeft.methods.prefix.PTuningV2"})) is PTuningV2
    with pytest.raises(LitPeftError, match="unknown method 'nope'"):
        method_from_config({"class_path": "nope"})
    with pytest.raises(LitPeftError, match="'litpeft.errors.LitPeftError' is not a litpeft PeftMethod"):
        method_from_config({"class_path": "litpeft.errors.LitPeftError"})
