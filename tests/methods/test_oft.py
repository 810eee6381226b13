"""OFT: identity start, orthogonal R (exact Cayley; the Neumann series as peft sums it), parity with Hugging
Face peft (count, logits, export), merge (the neurons' norms and angles kept), COFT, module dropout."""

from __future__ import annotations

import copy
import warnings

import method_helpers as helpers
import pytest
import torch
from adapter_helpers import logits, make_adapter, token_ids
from peft import OFTConfig, get_peft_model
from peft.tuners.oft.layer import OFTRotationModule

from litpeft.adapter_dir import load_adapter
from litpeft.commands import export_adapter
from litpeft.errors import LitPeftError
from litpeft.methods import OFT, OFTLinear, adapters_disabled, method_from_config
from litpeft.methods.oft import cayley, fit_blocks, skew
from litpeft.models import load_model


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    return helpers.randomized(model, scale=0.1)  # small angles: R stays near I


def upper(blocks: int, size: int, scale: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(blocks, size * (size - 1) // 2, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_untrained_is_the_base_and_disabled_is_the_base(arch: str) -> None:
    base = load_model(f"tiny:{arch}")
    x = token_ids()
    for method in (OFT(), OFT(use_cayley_neumann=False)):
        model = method.apply(copy.deepcopy(base)).eval()
        assert torch.equal(logits(model, x), logits(base, x))  # Q = 0: R = I exactly
    randomized(model)
    assert not torch.allclose(logits(model, x), logits(base, x), atol=1e-3)
    with adapters_disabled(model):
        assert torch.equal(logits(model, x), logits(base, x))


def test_cayley_is_orthogonal_and_neumann_is_peft_series() -> None:
    """Exact Cayley: R^T R = I and R = (I - Q)(I + Q)^-1 (peft's solve). Neumann: the series peft sums
    (n = 3 stops at Q^3 like n = 4), orthogonal up to its truncation error, which shrinks with more terms."""
    vec, size = upper(3, 8, 0.01), 8
    q, eye = skew(vec, size), torch.eye(size, dtype=torch.float64)
    assert torch.equal(q, -q.transpose(-2, -1))
    exact = cayley(vec, size, neumann=False, terms=5)
    torch.testing.assert_close(exact.transpose(-2, -1) @ exact, eye.expand(3, -1, -1), rtol=0, atol=1e-12)
    torch.testing.assert_close(exact, (eye - q) @ torch.linalg.inv(eye + q), rtol=0, atol=1e-12)
    series = {
        2: eye + 2 * q,
        3: eye + 2 * q + 2 * q @ q + q @ q @ q,
        4: eye + 2 * q + 2 * q @ q + q @ q @ q,
        5: eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q,
    }
    peft = OFTRotationModule(3, vec.shape[1], size, 3 * size)
    errors = []
    for n, expected in series.items():
        ours = cayley(vec, size, neumann=True, terms=n)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(ours, peft._cayley_batch(vec, size, True, n), rtol=0, atol=1e-12)
        errors.append((ours.transpose(-2, -1) @ ours - eye).abs().max().item())
    assert errors[-1] < errors[0] and errors[-1] < 1e-4  # approximately orthogonal for a small Q
    # the series is that of (I + Q)(I - Q)^-1 = the exact transform of -Q (peft's two modes differ in sign)
    neg = cayley(-vec, size, neumann=False, terms=5)
    torch.testing.assert_close(cayley(vec, size, neumann=True, terms=12), neg, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        ("llama", {}),
        ("qwen2", {"use_cayley_neumann": False, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
        ("gpt_neox", {"r": 4, "oft_block_size": 0}),
        ("llama", {"block_share": True, "num_cayley_neumann_terms": 3}),
        ("llama", {"coft": True, "eps": 1e-2}),
        ("llama", {"oft_block_size": 24}),  # moved to 16 for 64 and 128 inputs, as peft does
    ],
    ids=["llama", "qwen2-cayley", "gpt_neox-r", "block_share", "coft", "adjusted"],
)
def test_count_and_logits_equal_peft(arch: str, kwargs: dict) -> None:
    base = load_model(f"tiny:{arch}")
    ours = randomized(OFT(**kwargs).apply(copy.deepcopy(base)))
    config = OFTConfig(task_type="CAUSAL_LM", **{"target_modules": "all-linear", **kwargs})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns of the adjusted block size
        theirs = get_peft_model(copy.deepcopy(base), config).eval()
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                params[f"base_model.model.{name}".replace(".oft_R.", ".oft_R.default.")].copy_(p)
    assert count(ours) == count(theirs)
    x = token_ids()
    expected = logits(theirs, x)
    assert not torch.allclose(expected, logits(base, x), atol=1e-4)
    torch.testing.assert_close(logits(ours, x), expected, rtol=1e-5, atol=1e-5)


def test_trainable_count_by_hand() -> None:
    """b (b - 1) / 2 values per block: tiny:llama has 12 layers with 64 inputs and 2 with 128 (down_proj)."""
    model = OFT(oft_block_size=16).apply(load_model("tiny:llama"))
    assert count(model) == (12 * 4 + 2 * 8) * 16 * 15 // 2
    shared = OFT(oft_block_size=16, block_share=True).apply(load_model("tiny:llama"))
    assert count(shared) == 14 * 16 * 15 // 2
    assert [fit_blocks(64, b) for b in (24, 40, 100, 7, 5)] == [16, 32, 64, 8, 4]  # ties go down


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_equals_unmerged_and_keeps_the_neurons_angles(arch: str) -> None:
    method = OFT(use_cayley_neumann=False)
    model = randomized(method.apply(load_model(f"tiny:{arch}")))
    layer = next(m for m in model.modules() if isinstance(m, OFTLinear))
    w = layer.base_layer.weight.detach().clone()
    helpers.merged_keeping_logits(model, method)
    w2 = layer.base_layer.weight.detach()  # merged in place
    assert not torch.allclose(w, w2, atol=1e-3)
    # R is orthogonal: the Gram matrix of the neurons (rows of W; Conv1D stores W^T) is unchanged
    gram = (lambda m: m.T @ m) if arch == "gpt2" else (lambda m: m @ m.T)
    torch.testing.assert_close(gram(w2), gram(w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "spec, kwargs",
    [("tiny:llama", {}), ("tiny:qwen2", {"r": 2, "oft_block_size": 0, "coft": True, "eps": 0.05})],
    ids=["llama", "qwen2-r-coft"],
)
def test_litpeft_export_round_trips_through_peft(tmp_path, spec: str, kwargs: dict) -> None:
    helpers.assert_peft_loads_the_export(tmp_path, spec, OFT(**kwargs), atol=1e-4, scale=0.05)


def test_gpt2_conv1d_export_is_refused(tmp_path) -> None:
    adapter = make_adapter(tmp_path / "adapter", "tiny:gpt2", OFT(target_modules=["c_attn"]), scale=0.05)
    with pytest.raises(LitPeftError, match=r"^peft's OFT wraps nn.Linear layers only, .* Conv1D[^\n]*$"):
        export_adapter(str(adapter), str(tmp_path / "peft"))


def test_coft_keeps_each_block_in_its_ball_as_peft_projects() -> None:
    eps = 1e-2
    model = randomized(OFT(coft=True, eps=eps, oft_block_size=16).apply(load_model("tiny:llama")))
    layer = next(m for m in model.modules() if isinstance(m, OFTLinear)).oft_R
    before = layer.weight.detach().clone()
    model(input_ids=token_ids())  # the projection is written back on use, as peft does
    peft = OFTRotationModule(4, before.shape[1], 16, 64, coft=True, eps=eps)
    torch.testing.assert_close(
        layer.weight.detach(), peft._project_batch(before, eps=eps), rtol=1e-6, atol=1e-7
    )
    norms = torch.linalg.matrix_norm(skew(layer.weight.detach(), 16))
    assert torch.all(norms <= eps / 2 * (1 + 1e-5))  # radius eps / sqrt(4 blocks)


def test_module_dropout_sets_blocks_to_identity_in_training_only() -> None:
    model = randomized(OFT(oft_block_size=8, module_dropout=0.5).apply(load_model("tiny:llama")))
    rotation = next(m for m in model.modules() if isinstance(m, OFTLinear)).oft_R  # 8 blocks of 8
    eye = torch.eye(8)
    identity = lambda r: sum(torch.equal(b, eye) for b in r)  # noqa: E731
    x = torch.randn(3, 64)
    assert identity(rotation.rotations(dropout=True)) == 4  # int(0.5 * 8) blocks
    torch.testing.assert_close(rotation(x), x @ rotation.matrix())  # eval: no dropout
    model.train()
    torch.manual_seed(0)
    y = rotation(x)
    torch.manual_seed(0)
    torch.testing.assert_close(y, x @ torch.block_diag(*rotation.rotations(dropout=True)))
    assert not torch.allclose(y, x @ rotation.matrix())
    assert identity(rotation.rotations()) == 0  # without dropout (what merge folds in), also in training
    shared = (
        OFT(oft_block_size=8, module_dropout=0.5, block_share=True).apply(load_model("tiny:llama")).train()
    )
    rotation = next(m for m in shared.modules() if isinstance(m, OFTLinear)).oft_R
    with torch.no_grad():
        rotation.weight.normal_()
    assert identity(rotation.rotations(dropout=True)) == 0  # one shared block: no dropout, as in peft


def test_config_errors_are_one_line() -> None:
    with pytest.raises(
        ValueError, match=r"r: 4 is not allowed; set exactly one of r and oft_block_size \(now 32\)"
    ):
        OFT(r=4)
    with pytest.raises(ValueError, match="r: 0 is not allowed; set exactly one"):
        OFT(oft_block_size=0)
    with pytest.raises(ValueError, match="bias: 'all' is not allowed; 'none' only"):
        OFT(bias="all")
    with pytest.raises(ValueError, match="num_cayley_neumann_terms: 1 is not allowed; at least 2"):
        OFT(num_cayley_neumann_terms=1)
    with pytest.raises(ValueError, match=r"module_dropout: 1.0 is not allowed"):
        OFT(module_dropout=1.0)
    with pytest.raises(LitPeftError, match="target_modules: .* matched no layer"):
        OFT(target_modules=["nope"]).apply(load_model("tiny:llama"))
    method = OFT(oft_block_size=0, r=4, target_modules=["q_proj"], coft=True, block_share=True)
    assert method_from_config(method.config()).config() == method.config()


def test_merge_of_an_adapter_trained_on_an_nf4_base(tmp_path) -> None:
    """``litpeft merge`` on a quantized base: plain layers holding dequantized W R^T, which
    ``from_pretrained`` loads, with the logits of the quantized model + adapter."""
    from transformers import AutoModelForCausalLM

    from litpeft.commands import merge as merge_command

    adapter = make_adapter(tmp_path / "adapter", "tiny:llama", OFT(), scale=0.05, quantize="nf4")
    merge_command(str(adapter), str(tmp_path / "merged"))
    ours, _, _, _ = load_adapter(adapter)
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    x = token_ids()
    torch.testing.assert_close(logits(merged.eval(), x), logits(ours, x), atol=1e-4, rtol=1e-4)
