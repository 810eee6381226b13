"""AdaLoRA against Hugging Face peft: count, logits, the training loss with the regulariser, the rank
allocator step by step (budget, masks, importance), the peft export with its rank pattern, merge; inside
Lightning: the allocator stepped once per optimizer step, and a resumed run equal to an uninterrupted one."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import method_helpers as helpers
import pytest
import torch
from adapter_helpers import logits, token_ids
from peft import AdaLoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from litpeft import InstructionDataModule, PeftLM
from litpeft.adapter_dir import load_adapter, save_adapter
from litpeft.commands import export_adapter
from litpeft.data.prompts import get_style
from litpeft.errors import LitPeftError
from litpeft.methods import AdaLoRA, SVDLinear, method_from_config
from litpeft.methods.adalora_budget import SLOT
from litpeft.methods.layout import attached
from litpeft.models import load_model


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peft_pair(
    arch: str, targets: str | list[str] = "all-linear", **schedule: int
) -> tuple[torch.nn.Module, PeftModel]:
    """litpeft's and peft's AdaLoRA on the same base, litpeft's random tensors copied into peft's."""
    base = load_model(f"tiny:{arch}")
    kw = {"init_r": 4, "target_r": 2, **schedule}
    total = kw.pop("total_step", 10)
    ours = helpers.randomized(
        AdaLoRA(target_modules=targets, total_step=total, **rename(kw)).apply(copy.deepcopy(base))
    )
    config = AdaLoraConfig(target_modules=targets, total_step=total, fan_in_fan_out=arch == "gpt2", **kw)
    return ours, helpers.peft_twin(base, ours, config).eval()


def rename(peft_kwargs: dict[str, int]) -> dict[str, int]:
    return {("delta_t" if k == "deltaT" else k): v for k, v in peft_kwargs.items()}


def test_step0_is_the_base_and_disabled_is_the_base() -> None:
    # lambda = 0 at init
    helpers.assert_starts_as_base_and_disables_to_base(
        load_model("tiny:llama"), AdaLoRA(init_r=4, target_r=2)
    )


@pytest.mark.parametrize(
    "arch, targets",
    [("llama", "all-linear"), ("qwen2", ["q_proj", "v_proj"]), ("gpt2", "all-linear")],
)
def test_count_and_logits_equal_peft(arch: str, targets: str | list[str]) -> None:
    ours, theirs = peft_pair(arch, targets)
    layers = [m for m in ours.modules() if isinstance(m, SVDLinear)]
    assert (
        count(ours) == count(theirs) == sum(4 * (m.lora_A.shape[1] + 1 + m.lora_B.shape[0]) for m in layers)
    )
    x = token_ids()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), rtol=1e-5, atol=1e-5)


def test_training_loss_is_peft_loss_with_its_orthogonality_regulariser() -> None:
    """PeftLM's training step (token loss + the method's term) equals peft's ``outputs.loss``, which
    adds ``orth_reg_weight * R(P, Q)`` itself; the term is not small next to the LM loss here."""
    module = PeftLM("tiny:llama", method=AdaLoRA(init_r=4, target_r=2, orth_reg_weight=0.3, total_step=10))
    module.configure_model()
    helpers.randomized(module.model)
    config = AdaLoraConfig(
        init_r=4,
        target_r=2,
        target_modules="all-linear",
        orth_reg_weight=0.3,
        total_step=10,
        task_type="CAUSAL_LM",
    )
    theirs = get_peft_model(load_model("tiny:llama"), config).eval()
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if p.requires_grad:
                params[f"base_model.model.{name}.default"].copy_(p)
    ids = token_ids()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    expected = theirs(**batch).loss
    theirs.peft_config["default"].orth_reg_weight = 0.0
    assert float(expected - theirs(**batch).loss.detach()) > 0.1  # the regulariser is in it
    with pytest.warns(UserWarning, match="self.log"):  # no trainer here
        loss = module.training_step(batch, 0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_allocator_equals_peft_at_every_step() -> None:
    """The same weights and gradients, step after step, into litpeft's and peft's allocators: the same
    budget, the same importance EMAs and the same singular values masked, through the warm-up, the
    falling budget (masking every 2 steps), the final mask and the steps after it."""
    total = 14
    ours, theirs = peft_pair(
        "llama", ["q_proj", "v_proj", "down_proj"], tinit=2, tfinal=3, deltaT=2, total_step=total
    )
    method = AdaLoRA(init_r=4, target_r=2, tinit=2, tfinal=3, delta_t=2, total_step=total)
    allocator = attached(ours, SLOT)
    theirs_params = dict(theirs.base_model.model.named_parameters())
    ours_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    ranker = theirs.base_model.rankallocator
    g = torch.Generator().manual_seed(0)
    budgets, masked, tracked = [], [], []
    for step in range(1, total + 1):
        with torch.no_grad():  # a gradient, then an "optimizer step", the same on both sides
            for i, (name, p) in enumerate(ours_params.items()):
                grad = torch.randn(p.shape, generator=g) * (1 + i % 5)
                move = torch.randn(p.shape, generator=g) * 0.05
                for q in (p, theirs_params[f"{name}.default"]):
                    q.grad = grad.clone()
                    q.add_(move)
        method.after_optimizer_step(ours, step, 0)
        theirs.base_model.update_and_allocate(step)
        budget = allocator.budget(step, total)[0]
        assert budget == ranker.budget_schedule(step)[0], step
        budgets.append(budget)
        for name, p in ours_params.items():
            assert torch.equal(p, theirs_params[f"{name}.default"]), (step, name)
        assert {f"{k}.default" for k in allocator.exp_avg_ipt} == set(ranker.exp_avg_ipt), step
        tracked.append(len(allocator.exp_avg_ipt))
        for key, avg in allocator.exp_avg_ipt.items():
            assert torch.equal(avg, ranker.exp_avg_ipt[f"{key}.default"]), (step, key)
            assert torch.equal(allocator.exp_avg_unc[key], ranker.exp_avg_unc[f"{key}.default"]), (step, key)
        masked.append(sum(int((p == 0).sum()) for n, p in ours_params.items() if n.endswith("lora_E")))
    layers = len(allocator.layers)
    assert budgets[:2] == [4 * layers] * 2 and budgets[-4:] == [2 * layers] * 4
    assert budgets[2] < 4 * layers and budgets == sorted(budgets, reverse=True)
    assert masked[-1] >= 2 * layers and len(set(masked)) > 2  # masks taken, then undone by the steps
    assert tracked[:10] == [3 * layers] * 10 and tracked[10:] == [0] * 4  # EMAs, reset at the final mask
    pattern = theirs.peft_config["default"].rank_pattern
    assert {f"{n}.lora_E.default": v for n, v in allocator.rank_pattern.items()} == pattern


def test_a_step_with_inf_gradients_leaves_the_importance_alone() -> None:
    """Under an fp16 loss scaler a step with inf gradients is skipped by the optimizer; its inf must not
    enter the EMAs (peft's allocator would keep inf/nan scores from then on)."""
    model = helpers.randomized(
        AdaLoRA(init_r=4, target_r=2, target_modules=["q_proj"]).apply(load_model("tiny:llama"))
    )
    allocator = attached(model, SLOT)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.ones_like(p)
    allocator.step(1, 10)
    before = {k: v.clone() for k, v in allocator.exp_avg_ipt.items()}
    params[0].grad[0, 0] = float("inf")
    allocator.step(2, 10)
    assert all(torch.equal(before[k], v) for k, v in allocator.exp_avg_ipt.items())
    params[0].grad[0, 0] = 1.0
    allocator.step(3, 10)
    assert not torch.equal(
        before["model.layers.0.self_attn.q_proj.lora_A"],
        allocator.exp_avg_ipt["model.layers.0.self_attn.q_proj.lora_A"],
    )


def test_config_errors_are_one_line() -> None:
    with pytest.raises(ValueError, match=r"target_r: 12 is not allowed; AdaLoRA prunes from init_r down"):
        AdaLoRA(init_r=12, target_r=12)
    with pytest.raises(ValueError, match=r"total_step: 30 is not allowed; null or more than tinit \+ tfinal"):
        AdaLoRA(tinit=10, tfinal=20, total_step=30)
    with pytest.raises(ValueError, match="beta1: 1.0 is not allowed"):
        AdaLoRA(beta1=1.0)
    model = AdaLoRA(tinit=5, tfinal=5).apply(load_model("tiny:llama"))
    with pytest.raises(
        LitPeftError, match="tinit 5 \\+ tfinal 5 leave no budgeting phase in a 10-step schedule"
    ):
        AdaLoRA(tinit=5, tfinal=5).after_optimizer_step(model, 1, 10)
    method = AdaLoRA(init_r=6, target_r=3, target_modules=["q_proj"], delta_t=4)
    assert method_from_config(method.config()).config() == method.config()


def masked_adapter(directory: Path, spec: str, method: AdaLoRA) -> Path:
    """An adapter as a finished run leaves it: random tensors, some singular values masked (the first
    layer's all of them: rank 0)."""
    lm = PeftLM(model=spec, method=method)
    lm.configure_model()
    helpers.randomized(lm.model)
    with torch.no_grad():
        for i, layer in enumerate(m for m in lm.model.modules() if isinstance(m, SVDLinear)):
            layer.lora_E[: (4 if i == 0 else (i - 1) % 4)] = 0.0
    return save_adapter(directory, lm, get_style("alpaca", lm.tokenizer))


@pytest.mark.parametrize(
    "spec, targets", [("tiny:llama", "all-linear"), ("tiny:gpt2", ["c_attn"])], ids=["llama", "gpt2-conv1d"]
)
def test_export_keeps_the_living_singular_values_and_peft_reproduces_the_logits(
    tmp_path: Path, spec: str, targets: str | list[str]
) -> None:
    adapter = masked_adapter(
        tmp_path / "adapter", spec, AdaLoRA(init_r=4, target_r=2, target_modules=targets)
    )
    export_adapter(str(adapter), str(tmp_path / "peft"))
    ours, _, _, _ = load_adapter(adapter)
    theirs = PeftModel.from_pretrained(load_model(spec), str(tmp_path / "peft")).eval()
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, SVDLinear)}
    for name, layer in layers.items():  # peft resized each layer to its living singular values
        kept = int((layer.lora_E != 0).sum())
        assert theirs.base_model.model.get_submodule(name).lora_E["default"].shape == (kept, 1)
    assert {int((m.lora_E != 0).sum()) for m in layers.values()} >= {0, 4}
    x = token_ids()
    torch.testing.assert_close(logits(theirs, x), logits(ours, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_equals_unmerged(arch: str) -> None:
    method = AdaLoRA(init_r=4, target_r=2)
    model = helpers.randomized(method.apply(load_model(f"tiny:{arch}")))
    merged = helpers.merged_keeping_logits(model, method)  # merge checks: no AdaLoRA layer left
    assert attached(merged, SLOT) is None


# -- inside Lightning ------------------------------------------------------------------------------------
class Recording(AdaLoRA):
    """AdaLoRA that records each allocator call: the step, the schedule's length, the gradient norm."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[int, int, float]] = []

    def after_optimizer_step(self, model: torch.nn.Module, step: int, total_steps: int) -> None:
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        self.calls.append((step, total_steps, float(sum(g.norm() for g in grads if g is not None))))
        super().after_optimizer_step(model, step, total_steps)


def fit(
    data: Path, root: Path, method: AdaLoRA, steps: int, accumulate: int = 1, stop_at: int | None = None, **kw
) -> PeftLM:
    L.seed_everything(0)

    class Stop(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            trainer.should_stop = stop_at is not None and trainer.global_step >= stop_at

    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=1.0,
        default_root_dir=root,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True), Stop()],
    )
    module = PeftLM("tiny:llama", method=method, adapter_dir=str(root / "adapter"))
    module.optimizer_init = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}}
    dm = InstructionDataModule(train_file=str(data), val_fraction=0.0, batch_size=2, max_seq_length=48)
    trainer.fit(module, dm, **kw)
    return module


def test_fit_steps_the_allocator_once_per_optimizer_step_with_the_gradients(
    word_data: Path, tmp_path: Path
) -> None:
    """Two micro-batches per step: steps 1..5 of the trainer's 5 (total_step null), each with the
    gradients present; the final mask is taken at the last step, so the adapter keeps the target budget."""
    method = Recording(init_r=4, target_r=2, target_modules=["q_proj", "v_proj"], tinit=1, delta_t=2)
    module = fit(word_data, tmp_path, method, steps=5, accumulate=2)
    assert [(s, t) for s, t, _ in method.calls] == [(s, 5) for s in range(1, 6)]
    assert method.total_step == 5  # recorded: the adapter's config says which schedule it ran
    assert all(norm > 0 for _, _, norm in method.calls)
    allocator = attached(module.model, SLOT)
    kept = sum(sum(v) for v in allocator.rank_pattern.values())
    assert kept <= allocator.target_budget < allocator.init_budget
    saved = load_file(tmp_path / "adapter" / "adapter.safetensors")  # the final adapter: masked as well
    assert sum(int((v != 0).sum()) for k, v in saved.items() if k.endswith("lora_E")) == kept


def test_resumed_run_equals_the_uninterrupted_one(word_data: Path, tmp_path: Path) -> None:
    """Stop after 3 of 7 steps (of a 12-step schedule: still pruning at the end) and resume: the EMAs and
    masks come back from the checkpoint, so every tensor and EMA ends as in the run that was not
    interrupted (EMAs restarted from 0 would differ)."""

    def make() -> AdaLoRA:
        targets = ["q_proj", "v_proj"]
        return AdaLoRA(init_r=4, target_r=2, target_modules=targets, tinit=1, tfinal=2, total_step=12)

    full = fit(word_data, tmp_path / "full", make(), steps=7)
    fit(word_data, tmp_path / "part", make(), steps=7, stop_at=3)
    last = tmp_path / "part/ckpt/last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["litpeft"]["method_state"]["exp_avg_ipt"]
    resumed = fit(word_data, tmp_path / "part", make(), steps=7, ckpt_path=str(last))
    ours = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    for n, p in full.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[n], p, rtol=1e-5, atol=1e-6, msg=n)
    a, b = attached(resumed.model, SLOT), attached(full.model, SLOT)
    assert a.rank_pattern == b.rank_pattern and a.exp_avg_ipt.keys() == b.exp_avg_ipt.keys()
    for key, avg in b.exp_avg_ipt.items():
        torch.testing.assert_close(a.exp_avg_ipt[key], avg, rtol=1e-4, atol=1e-9, msg=key)
        torch.testing.assert_close(a.exp_avg_unc[key], b.exp_avg_unc[key], rtol=1e-4, atol=1e-9, msg=key)
