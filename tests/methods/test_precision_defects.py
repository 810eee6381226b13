"""Issue #16, defects 2 and 3, through PeftLM and a Lightning Trainer (the real precision path, not a
model cast to bf16 by hand): under ``bf16-true`` every trainable tensor and its AdamW state is fp32 and
one small step moves it, and LLaMA-Adapter runs on a bf16 base outside autocast (training, validation,
packing and a plain call after ``fit``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from litpeft.data import InstructionDataModule
from litpeft.methods import PeftMethod, method_from_config
from litpeft.methods.layout import TrainableNorm
from litpeft.module import PeftLM

LR = 5e-4  # configs/adapter.yaml's; near 1 a bf16 tensor moves only by steps of 2^-8 = 3.9e-3


class Initial(L.Callback):
    """The trainable tensors as training starts (after the sanity validation pass)."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.values = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}


def fit(
    tmp_path: Path, model: str, method: PeftMethod, precision: str, steps: int = 2, packing: bool = False
) -> tuple[PeftLM, dict[str, torch.Tensor]]:
    """``steps`` AdamW steps (lr 5e-4) of ``method`` on ``model`` after one validation batch; returns the
    module and its trainable tensors as they were when training started."""
    words = ["alpha", "gamma", "delta", "omega", "kappa", "sigma"]
    rows = [{"instruction": f"Say {w} twice.", "output": f"{w} {w}"} for w in words * 2]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    L.seed_everything(0)
    module = PeftLM(model, method=method, adapter_dir=str(tmp_path / "adapter"))
    module.optimizer_init = {"class_path": "torch.optim.AdamW", "init_args": {"lr": LR, "weight_decay": 0.0}}
    data = InstructionDataModule(
        train_file=str(tmp_path / "train.jsonl"),
        val_fraction=0.25,
        batch_size=4,
        packing=packing,
        cache=False,
    )
    initial = Initial()
    trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        default_root_dir=str(tmp_path),
        callbacks=[initial],
    )
    trainer.fit(module, datamodule=data)
    return module, initial.values


METHODS: dict[str, dict[str, Any]] = {
    "houlsby": {"class_path": "houlsby", "init_args": {"bottleneck_size": 8}},
    "llama_adapter": {"class_path": "llama_adapter", "init_args": {"adapter_len": 4}},
    "llama_adapter_v2": {"class_path": "llama_adapter_v2", "init_args": {"adapter_len": 4}},
    "lora": {"class_path": "lora", "init_args": {"r": 4}},
    "dora": {"class_path": "lora", "init_args": {"r": 4, "use_dora": True, "dropout": 0.1}},
}


@pytest.mark.parametrize(
    "arch, method",
    [
        ("llama", "houlsby"),
        ("gpt2", "houlsby"),  # LayerNorm with a bias
        ("llama", "llama_adapter"),
        ("qwen2", "llama_adapter_v2"),
        ("gpt2", "llama_adapter_v2"),
        ("llama", "lora"),
        ("llama", "dora"),
    ],
)
def test_bf16_true_trains_every_tensor_in_fp32(tmp_path: Path, arch: str, method: str) -> None:
    """bf16-true: the base is bf16, every trainable tensor and its AdamW state fp32, and two steps at
    lr 5e-4 move every one of them (a zero-init B or gate leaves its partner still for one step)."""
    module, initial = fit(tmp_path, f"tiny:{arch}", method_from_config(METHODS[method]), "bf16-true")
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable.keys() == initial.keys()
    wrong = sorted(n for n, p in trainable.items() if p.dtype != torch.float32)
    assert not wrong, f"{len(wrong)} trainable tensors not fp32, e.g. {wrong[:3]}"
    state = module.trainer.optimizers[0].state
    for n, p in trainable.items():
        assert state[p]["exp_avg"].dtype == state[p]["exp_avg_sq"].dtype == torch.float32, n
    still = sorted(n for n, p in trainable.items() if torch.equal(p, initial[n]))
    assert not still, f"{len(still)} of {len(trainable)} trainable tensors did not move, e.g. {still[:3]}"
    frozen = {p.dtype for p in module.parameters() if not p.requires_grad and p.is_floating_point()}
    assert frozen == {torch.bfloat16}
    # a plain call after fit (no autocast) gives the base's dtype
    module.model.eval()
    with torch.no_grad():
        assert module.model(torch.randint(3, 250, (2, 7))).logits.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "arch, method, packing",
    [
        ("qwen2", "llama_adapter_v2", True),  # the reproduction (with --data.packing true)
        ("llama", "llama_adapter", False),
        ("gpt2", "llama_adapter", False),  # fused c_attn
        ("phi3", "llama_adapter_v2", False),  # fused qkv_proj
    ],
)
@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_llama_adapter_on_a_bf16_base_outside_autocast(
    tmp_path: Path, arch: str, method: str, packing: bool, precision: str
) -> None:
    """fp32 prompts meet the bf16 key/value projections of the base: fit (validation, training), then a
    plain call in eval mode without autocast, with the gates open so that the prompts count."""
    config = METHODS[method]
    module, _ = fit(tmp_path, f"tiny:{arch}", method_from_config(config), precision, packing=packing)
    model = module.model.eval()
    ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        closed = model(ids).logits
        for n, p in model.named_parameters():
            if n.endswith("litpeft_adaption.gate"):
                p.fill_(0.5)
        opened = model(ids).logits
    assert opened.isfinite().all() and not torch.equal(opened, closed)
    # the gradient reaches the fp32 prompts through the cast at the boundary
    model.train()
    model(ids).logits.float().pow(2).mean().backward()
    prompts = [p for n, p in model.named_parameters() if n.endswith("litpeft_adaption.prompt")]
    assert prompts and all(p.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in prompts)


def test_trainable_norm_is_an_fp32_copy_that_starts_at_the_base_norm() -> None:
    """Under bf16-true the trained norm is an fp32 copy; at step 0 it computes the bf16 base norm's
    output bit for bit, in the stream's dtype; disabled, it is the base norm."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    base = LlamaRMSNorm(16).to(torch.bfloat16)
    with torch.no_grad():
        base.weight.normal_(1.0, 0.1)
    x = torch.randn(3, 16).bfloat16()
    expected = base(x)
    norm = TrainableNorm(base, "tuned")
    assert norm.tuned.weight.dtype == torch.float32 and norm.tuned.weight.requires_grad
    out = norm(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    with torch.no_grad():
        norm.tuned.weight.add_(1e-3)  # below bf16's resolution near 1, above fp32's
    assert not torch.equal(norm(x), expected)
    norm.disabled = True
    assert torch.equal(norm(x), expected)


def test_llama_adapter_v2_trained_under_bf16_true_merges_into_a_bf16_model(tmp_path: Path) -> None:
    """The fp32 norms, biases and scales fold back into the bf16 base: a plain bf16 model whose logits
    are the adapted model's without the prompts (gates closed) within bf16 rounding."""
    method = method_from_config(METHODS["llama_adapter_v2"])
    module, _ = fit(tmp_path, "tiny:llama", method, "bf16-true", steps=1)
    model = module.model.eval()
    ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("litpeft_adaption.gate"):
                p.zero_()  # merge leaves the prompts out: compare without them
        before = model(ids).logits.float()
        merged = method.merge(model)
        assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
        after = merged(ids).logits.float()
    torch.testing.assert_close(after, before, rtol=0.05, atol=0.05)
