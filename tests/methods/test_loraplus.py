"""LoRA+ (``PeftLM(loraplus_lr_ratio=...)``): B's parameter group gets the ratio'd LR, as peft's
``create_loraplus_optimizer`` groups them, and a step moves B by that LR."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer

from litpeft.errors import LitPeftError
from litpeft.methods import IA3, LoRA, LoRALinear
from litpeft.models import load_model
from litpeft.module import PeftLM
from litpeft.schedulers import WarmupCosine

LR, RATIO = 1e-3, 16.0


def module(arch: str, method: LoRA, optimizer: str = "torch.optim.AdamW", **kwargs) -> PeftLM:
    lm = PeftLM(model=f"tiny:{arch}", method=method, loraplus_lr_ratio=RATIO)
    lm.configure_model()
    lm.optimizer_init = {"class_path": optimizer, "init_args": {"lr": LR, **kwargs}}
    return lm


def numel_by_lr(optimizer: torch.optim.Optimizer) -> dict[float, int]:
    out: dict[float, int] = {}
    for group in optimizer.param_groups:
        n = sum(p.numel() for p in group["params"])
        if n:
            out[round(group["lr"], 12)] = out.get(round(group["lr"], 12), 0) + n
    return out


@pytest.mark.parametrize(
    "arch, kwargs, peft_kwargs",
    [
        ("llama", {"r": 4}, {"r": 4, "target_modules": "all-linear"}),
        ("llama", {"r": 4, "use_dora": True}, {"r": 4, "target_modules": "all-linear", "use_dora": True}),
        ("gpt2", {"r": 4, "bias": "all"}, {"r": 4, "target_modules": "all-linear", "bias": "all"}),
    ],
    ids=["lora", "dora", "gpt2-bias-all"],
)
def test_param_groups_equal_peft_create_loraplus_optimizer(
    arch: str, kwargs: dict, peft_kwargs: dict
) -> None:
    """How many tensor elements train at LR and at RATIO x LR: the same as peft's LoRA+ optimizer over
    peft's model of the same config (B, DoRA's magnitudes and biases at the larger LR), and every
    trainable tensor in exactly one group."""
    lm = module(arch, LoRA(**kwargs))
    optimizer = lm.configure_optimizers()
    theirs_model = get_peft_model(load_model(f"tiny:{arch}"), LoraConfig(**peft_kwargs))
    theirs = create_loraplus_optimizer(theirs_model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO)
    assert numel_by_lr(optimizer) == numel_by_lr(theirs)
    assert set(numel_by_lr(optimizer)) == {LR, round(LR * RATIO, 12)}
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in lm.trainable_parameters())
    b = {id(m.lora_B.weight) for m in lm.model.modules() if isinstance(m, LoRALinear)}
    assert all(
        g["lr"] == pytest.approx(LR * RATIO)
        for g in optimizer.param_groups
        if b & {id(p) for p in g["params"]}
    )


def test_an_sgd_step_moves_b_by_ratio_times_the_lr() -> None:
    """Plain SGD: each tensor moves by -lr_group * grad. A moves with LR, B with RATIO x LR."""
    lm = module("llama", LoRA(r=4, target_modules=["q_proj"]), optimizer="torch.optim.SGD")
    with torch.no_grad():
        for m in lm.model.modules():
            if isinstance(m, LoRALinear):  # B = 0 gives A no gradient
                m.lora_B.weight.normal_(generator=torch.Generator().manual_seed(0))
    optimizer = lm.configure_optimizers()
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    lm.model(input_ids=ids, labels=ids).loss.backward()
    layer = lm.model.model.layers[0].self_attn.q_proj
    before = {
        k: (p.detach().clone(), p.grad.clone())
        for k, p in (("A", layer.lora_A.weight), ("B", layer.lora_B.weight))
    }
    optimizer.step()
    for key, p, lr in (("A", layer.lora_A.weight, LR), ("B", layer.lora_B.weight, LR * RATIO)):
        w, grad = before[key]
        assert grad.abs().max() > 0
        torch.testing.assert_close(p.detach(), w - lr * grad, rtol=1e-6, atol=1e-9)


def test_the_schedule_keeps_the_ratio() -> None:
    """WarmupCosine (a LambdaLR) scales each group's own initial LR: B stays at RATIO x A's LR."""
    optimizer = module("llama", LoRA(r=2)).configure_optimizers()
    scheduler = WarmupCosine(optimizer, warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        a, b = (g["lr"] for g in optimizer.param_groups)
        assert b == pytest.approx(RATIO * a) and a <= LR


def test_loraplus_needs_a_lora_method() -> None:
    with pytest.raises(LitPeftError, match=r"^model.loraplus_lr_ratio: 16.0 is not allowed; .* not 'ia3'$"):
        PeftLM(model="tiny:llama", method=IA3(), loraplus_lr_ratio=16.0)
    with pytest.raises(LitPeftError, match=r"loraplus_lr_ratio: 0.0 is not allowed; a positive ratio"):
        PeftLM(model="tiny:llama", method=LoRA(), loraplus_lr_ratio=0.0)
