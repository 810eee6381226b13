"""The shared pieces of litpeft/methods/base.py: the CPU dropout used by LoRA and the prefix methods."""

from __future__ import annotations

import math

import pytest
import torch

from litpeft.methods.base import Dropout

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
