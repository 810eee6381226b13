"""Precision (32-true, bf16-mixed, bf16-true) and gradient checkpointing on one device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adapter_helpers import fit_tiny_lora

from litpeft.methods import LoRA
from litpeft.module import PeftLM


def test_bf16_true_keeps_the_adapter_and_its_optimizer_state_in_fp32(tmp_path: Path) -> None:
    module = fit_tiny_lora(tmp_path, "bf16-true")
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    frozen = [p for p in module.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)  # trained from B = 0
    state = module.trainer.optimizers[0].state
    assert all(state[p]["exp_avg"].dtype == torch.float32 for p in trainable.values())
    ids = torch.randint(0, 250, (1, 8))
    with torch.no_grad():
        assert module.model(ids).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fp32_weights_train_under_32_true_and_bf16_mixed(tmp_path: Path, precision: str) -> None:
    module = fit_tiny_lora(tmp_path, precision)
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert all(p.abs().sum() > 0 for n, p in module.named_parameters() if "lora_B" in n)


def test_bf16_true_on_a_quantized_base(tmp_path: Path) -> None:
    module = fit_tiny_lora(tmp_path, "bf16-true", quantize="nf4")
    absmax = [p for n, p in module.named_parameters() if n.endswith("absmax")]
    assert absmax and all(p.dtype == torch.float32 for p in absmax)  # bitsandbytes wants fp32 absmaxes
    assert all(p.abs().sum() > 0 for n, p in module.named_parameters() if "lora_B" in n)


def test_precision_cast_of_a_built_module_moves_but_never_downcasts_the_adapter() -> None:
    module = PeftLM("tiny:llama", method=LoRA(r=4))
    module.configure_model()
    module.to(torch.bfloat16)
    for n, p in module.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), n


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients() -> None:
    def grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        torch.manual_seed(0)
        module = PeftLM("tiny:llama", method=LoRA(r=4), gradient_checkpointing=checkpointing)
        module.configure_model()
        with torch.no_grad():
            for n, p in module.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.05)
        calls = []
        module.model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(1)
        ids = torch.randint(0, 250, (2, 16))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        loss, _, _ = module.loss_and_accuracy(batch)
        loss.backward()
        return {n: p.grad for n, p in module.named_parameters() if p.requires_grad}, len(calls)

    plain, plain_calls = grads(False)
    checkpointed, checkpointed_calls = grads(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the layer ran again in the backward pass
    assert plain.keys() == checkpointed.keys()
    for n, g in plain.items():
        torch.testing.assert_close(checkpointed[n], g)
