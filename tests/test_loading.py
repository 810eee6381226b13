"""Reading the base straight in its storage dtypes (litpeft.loading): the same model, no fp32 copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

from litpeft.methods import LoRA
from litpeft.models import load_model, tiny_tokenizer
from litpeft.module import PeftLM


def _save_tiny(tmp_path: Path, arch: str, dtype: torch.dtype) -> str:
    """``tiny:<arch>`` written as a model directory whose checkpoint is stored in ``dtype``."""
    directory = tmp_path / f"{arch}-{str(dtype).split('.')[-1]}"
    model = load_model(f"tiny:{arch}").to(dtype)
    with torch.no_grad():  # biases are zero at init: give them values that bf16 would round
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(n)))
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return str(directory)


def _build(spec: str, method: LoRA, quantize: str | None, planned: bool) -> PeftLM:
    torch.manual_seed(0)
    module = PeftLM(spec, method=method, quantize=quantize)
    module.trainer = Trainer(precision="bf16-mixed", logger=False, enable_progress_bar=False)
    if not planned:  # the fp32 load followed by the casts, as before litpeft.loading
        module.storage_dtypes = lambda: None
    module.configure_model()
    return module


def _loss_and_grads(module: PeftLM) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)  # the same dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = module.loss_and_accuracy({"input_ids": ids, "labels": ids})
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "arch, checkpoint, method, quantize",
    [
        ("llama", torch.bfloat16, "lora", None),
        ("llama", torch.float32, "lora", None),
        ("gpt2", torch.bfloat16, "lora", None),  # Conv1D, tied head, biases
        ("gpt2", torch.float32, "lora", None),
        ("gpt2", torch.float32, "lora_bias", None),  # trained biases stay fp32
        ("llama", torch.float32, "dora", None),  # DoRA reads its base layers (q, v) in fp32, the rest not
        ("llama", torch.bfloat16, "lora", "nf4"),  # quantized from the bf16 weights
        ("gpt2", torch.bfloat16, "lora", "int8"),
    ],
)
def test_reading_in_storage_dtypes_builds_the_same_model(
    tmp_path: Path, arch: str, checkpoint: torch.dtype, method: str, quantize: str | None
) -> None:
    spec = _save_tiny(tmp_path, arch, checkpoint)
    kwargs = {
        "dora": {"use_dora": True, "target_modules": ["q_proj", "v_proj"]},
        "lora_bias": {"bias": "lora_only"},
    }.get(method, {})
    old, new = (_build(spec, LoRA(r=4, **kwargs), quantize, planned) for planned in (False, True))
    assert new.storage_dtypes(), "nothing was read in 16 bits"
    a, b = old.state_dict(), new.state_dict()
    assert list(a) == list(b)
    assert any(t.dtype == torch.bfloat16 for t in b.values())
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    (loss_a, grads_a), (loss_b, grads_b) = _loss_and_grads(old), _loss_and_grads(new)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=0, msg=name)


class _Float32Allocations(TorchDispatchMode):
    """Records the shape of every fp32 tensor (not on the meta device) an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and not t.is_meta:
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_no_fp32_copy_of_a_frozen_linear_weight_under_bf16_mixed(
    tmp_path: Path, arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building from a bf16 checkpoint never makes an fp32 tensor of a linear weight's shape."""
    spec = _save_tiny(tmp_path, arch, torch.bfloat16)
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")  # dispatch modes see this thread only
    module = PeftLM(spec, method=LoRA(r=4))
    module.trainer = Trainer(precision="bf16-mixed", logger=False, enable_progress_bar=False)
    with _Float32Allocations() as spy:
        module.configure_model()
    linear = {
        tuple(m.weight.shape)
        for m in module.model.modules()
        if type(m) in (torch.nn.Linear, Conv1D) and not m.weight.requires_grad
    }
    linear -= {tuple(module.model.get_input_embeddings().weight.shape)}  # a tied head reads the fp32 table
    assert linear and not [shape for shape in spy.shapes if shape in linear]
