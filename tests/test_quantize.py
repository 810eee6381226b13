"""model.quantize: the quantized frozen base (litpeft/quantize.py) against references written here."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from adapter_helpers import fit_tiny_lora
from torch import nn

from litpeft.adapter_dir import load_adapter, read_adapter_config
from litpeft.errors import LitPeftError
from litpeft.methods import LoRA
from litpeft.methods.base import METHODS
from litpeft.models import load_model, tiny_tokenizer
from litpeft.module import PeftLM
from litpeft.quantize import MODES, QuantizedLinear, quantize_model

# The 16 NormalFloat4 levels as published (Dettmers et al. 2023, QLoRA, appendix E).
NF4 = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0]
)  # fmt: skip


def nf4_reference(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """QLoRA eq. 1-2: per block of 64 weights, scale by the absmax and round to the nearest NF4 level."""
    blocks = w.flatten().reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    idx = (blocks / absmax).unsqueeze(-1).sub(NF4).abs().argmin(-1)
    return (NF4[idx] * absmax).reshape(w.shape)


def int8_reference(w: torch.Tensor) -> torch.Tensor:
    """LLM.int8() vector-wise quantization: per output row, q = round(127 w / absmax)."""
    absmax = w.abs().amax(dim=1, keepdim=True)
    return torch.round(w * 127 / absmax) * absmax / 127


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(128, 96, bias=True)


def test_nf4_matches_the_published_levels(linear: nn.Linear) -> None:
    q = QuantizedLinear.from_float(linear, "nf4")
    torch.testing.assert_close(q.dequantize(), nf4_reference(linear.weight.detach()), atol=1e-6, rtol=0)
    # double quantization only approximates the absmaxes (8-bit, blocks of 256)
    dq = QuantizedLinear.from_float(linear, "nf4-dq").dequantize()
    torch.testing.assert_close(dq, nf4_reference(linear.weight.detach()), atol=2e-3, rtol=0)


def test_int8_matches_vectorwise_reference(linear: nn.Linear) -> None:
    q = QuantizedLinear.from_float(linear, "int8")
    torch.testing.assert_close(q.dequantize(), int8_reference(linear.weight.detach()), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_16bit_dequantization_is_the_reference_rounded(linear: nn.Linear, dtype: torch.dtype) -> None:
    """The 16-bit path (its own formula, for speed) is within 2 rounding steps of the fp32 reference."""
    q = QuantizedLinear.from_float(linear, "int8")
    reference = int8_reference(linear.weight.detach())
    low = q.dequantize(dtype)
    assert low.dtype == dtype
    step = torch.finfo(dtype).eps * reference.abs()  # one unit in the last place, relative
    assert ((low.float() - reference).abs() <= 2 * step + 1e-12).all()


@pytest.mark.parametrize("mode", MODES)
def test_forward_and_input_gradient_use_the_dequantized_weight(linear: nn.Linear, mode: str) -> None:
    q = QuantizedLinear.from_float(linear, mode)
    w = q.dequantize()
    rel = (w - linear.weight).norm() / linear.weight.norm()
    assert rel < 0.2  # 4-bit error is ~10%, int8 ~1%
    x = torch.randn(3, 5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = q(x), x_ref @ w.T + linear.bias.detach()
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert not any(p.requires_grad for p in q.parameters())


@pytest.mark.parametrize("mode", MODES)
def test_meta_build_has_the_real_shapes(linear: nn.Linear, mode: str) -> None:
    """FSDP ranks other than 0 build on the meta device; their tensors must match rank 0's."""
    real = QuantizedLinear.from_float(linear, mode)
    meta = QuantizedLinear.from_float(copy.deepcopy(linear).to("meta"), mode)
    assert {k: (v.shape, v.dtype) for k, v in real.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in meta.state_dict().items()
    }


def test_precision_cast_keeps_quantization_state(linear: nn.Linear) -> None:
    q = QuantizedLinear.from_float(linear, "nf4").to(torch.bfloat16)
    assert q.absmax.dtype == torch.float32 and q.qweight.dtype == torch.uint8
    assert q.bias.dtype == torch.bfloat16
    assert q(torch.randn(2, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q(torch.randn(2, 128)).dtype == torch.bfloat16


def test_quantize_model_skips_the_lm_head_and_saves_memory() -> None:
    tok = tiny_tokenizer()
    model = load_model("tiny:qwen2", tokenizer=tok)  # untied head: a separate nn.Linear
    before = {n: m.weight.numel() * 4 for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantize_model(model, "nf4")
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds.pop("lm_head") is nn.Linear
    assert set(kinds.values()) == {QuantizedLinear}
    after = sum(sum(p.numel() * p.element_size() for p in model.get_submodule(n).parameters()) for n in kinds)
    assert after < 0.2 * sum(v for n, v in before.items() if n != "lm_head")


def test_bad_mode_and_missing_bitsandbytes_fail_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LitPeftError, match="model.quantize"):
        PeftLM("tiny:llama", quantize="nf3")  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    model = load_model("tiny:llama", tokenizer=tiny_tokenizer())
    with pytest.raises(LitPeftError, match="pip install 'litpeft\\[quant\\]'"):
        quantize_model(model, "nf4")


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The reference: a plain model whose linear weights are the quantized model's dequantized ones."""
    ref = copy.deepcopy(model)
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            plain.weight.data = m.dequantize()
            if m.bias is not None:
                plain.bias.data = m.bias.detach().clone()
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, plain.requires_grad_(False))
    return ref


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_every_method_trains_on_a_quantized_base_after_an_eval_pass(method_name: str, mode: str) -> None:
    """Gradients flow (and equal those on the dequantized plain model) after an eval/no-grad forward.

    bitsandbytes' own Linear4bit repacks on such a pass on AVX512-BF16 CPUs and loses its backward.
    """
    tok = tiny_tokenizer()
    model = quantize_model(load_model("tiny:llama", tokenizer=tok), mode)
    ref = dequantized_copy(model)
    # tiny:llama has no biases: BitFit adds them (zero) to train anything
    options = {"add_missing_biases": True} if method_name == "bitfit" else {}
    torch.manual_seed(0)
    METHODS[method_name](**options).apply(model)
    torch.manual_seed(0)
    METHODS[method_name](**options).apply(ref)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ref_trainable = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    assert trainable.keys() == ref_trainable.keys()
    with torch.no_grad():  # zero-init methods give no gradient to some tensors at step 0: perturb them
        for n, p in trainable.items():
            p.add_(0.05 * torch.randn_like(p))
            ref_trainable[n].copy_(p)
    ids = torch.randint(0, 250, (2, 12))
    model.eval()
    with torch.no_grad():
        model(ids)
    model.train()
    ref.train()
    model(ids, labels=ids).loss.backward()
    ref(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        assert g is not None and g.abs().sum() > 0, n
        torch.testing.assert_close(g, ref_grads[n], atol=1e-5, rtol=1e-4)


def test_lora_merge_into_a_quantized_base_writes_plain_weights() -> None:
    tok = tiny_tokenizer()
    model = quantize_model(load_model("tiny:llama", tokenizer=tok), "nf4")
    method = LoRA(r=4)
    method.apply(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    ids = torch.randint(0, 250, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        merged = method.merge(model)
        after = merged(ids).logits
    layers = [m for m in merged.modules() if isinstance(m, nn.Linear)]
    assert layers and all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in layers)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_fit_on_nf4_after_sanity_check_trains_and_adapter_reloads_quantized(tmp_path: Path) -> None:
    """Lightning's sanity check (eval, no grad) runs first; LoRA B must still move away from zero."""
    module = fit_tiny_lora(tmp_path, num_sanity_val_steps=1, quantize="nf4")
    b = [p for n, p in module.named_parameters() if "lora_B" in n]
    assert b and all(p.abs().sum() > 0 for p in b)
    assert read_adapter_config(tmp_path / "adapter")["quantize"] == "nf4"
    model, *_ = load_adapter(tmp_path / "adapter")
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    ids = torch.randint(0, 250, (1, 8))
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, module.model(ids).logits)
