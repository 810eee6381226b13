"""PreferenceLM: its reference policy (the base, or the starting SFT adapter, with no second model), the
metrics it logs, every method family under it, and one-line refusals of bad settings."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from adapter_helpers import make_adapter, write_jsonl
from preference_helpers import PAIRS, batch, policy
from torch.testing import assert_close
from trl.experimental.cpo import CPOTrainer

from litpeft.adapter_dir import load_adapter
from litpeft.errors import LitPeftError
from litpeft.methods import (
    IA3,
    OFT,
    AdaLoRA,
    BitFit,
    HoulsbyAdapter,
    LlamaAdapterV2,
    LNTuning,
    LoHa,
    LoKr,
    LoRA,
    PrefixTuning,
    PromptTuning,
    PTuning,
    PTuningV2,
    VeRA,
)
from litpeft.methods.llama_adapter import LlamaAdapter
from litpeft.models import load_model
from litpeft.preference import PreferenceLM
from litpeft.preference.data import PreferenceDataModule
from litpeft.preference.module import token_logps


def _logps(model, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """TRL's per-sequence log-probs from the full logits of ``model`` (an independent path)."""
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return CPOTrainer.get_batch_logps(logits, b["labels"])


def test_reference_log_probs_are_the_base_models() -> None:
    module = policy("dpo")
    b = batch(module)
    base = load_model("tiny:llama", tokenizer=module.tokenizer)
    with module.reference_policy():
        reference = token_logps(module.model, b)[0].sum(-1)
        assert not torch.is_grad_enabled() and not module.model.training
    assert_close(reference, _logps(base, b), rtol=1e-5, atol=1e-4)
    assert module.model.training  # back in train mode, method switched on again
    assert float((token_logps(module.model, b)[0].sum(-1).detach() - reference).abs().max()) > 1e-2


def test_init_adapter_makes_the_sft_adapter_the_reference_without_a_second_model(tmp_path: Path) -> None:
    lora = LoRA(r=4, alpha=8, dropout=0.0)
    sft = make_adapter(tmp_path / "sft", "tiny:llama", lora, style="plain")
    module = PreferenceLM("tiny:llama", method=LoRA(r=4, alpha=8, dropout=0.0), init_adapter=str(sft))
    module.configure_model()
    trainable = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    assert set(module.reference_tensors) == set(trainable)  # only the adapter's tensors are copied
    b = batch(module)
    sft_model = load_adapter(sft)[0]  # the SFT policy, loaded on its own
    assert_close(token_logps(module.model, b)[0].sum(-1), _logps(sft_model, b), rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # training moves the policy away from its start
        for p in trainable.values():
            p.add_(0.2)
    moved = token_logps(module.model, b)[0].sum(-1).detach()
    with module.reference_policy():
        reference = token_logps(module.model, b)[0].sum(-1)
    assert_close(reference, _logps(sft_model, b), rtol=1e-5, atol=1e-4)
    assert_close(token_logps(module.model, b)[0].sum(-1).detach(), moved)  # the trained values are back
    assert float((moved - reference).abs().max()) > 1e-2
    base = load_model("tiny:llama", tokenizer=module.tokenizer)
    assert float((reference - _logps(base, b)).abs().max()) > 1e-2  # not the bare base


#: every method besides LoRA (the other tests' method), small settings for the tiny model
OTHER_METHODS = {
    "prompt_tuning": lambda: PromptTuning(num_virtual_tokens=4),
    "p_tuning": lambda: PTuning(num_virtual_tokens=4),
    "prefix_tuning": lambda: PrefixTuning(num_virtual_tokens=4),
    "p_tuning_v2": lambda: PTuningV2(num_virtual_tokens=4),
    "houlsby": lambda: HoulsbyAdapter(bottleneck_size=8),
    "llama_adapter": lambda: LlamaAdapter(adapter_len=4),
    "llama_adapter_v2": lambda: LlamaAdapterV2(adapter_len=4),
    "ia3": IA3,
    "ln_tuning": LNTuning,
    "bitfit": lambda: BitFit(add_missing_biases=True),
    "vera": lambda: VeRA(r=8),
    "loha": lambda: LoHa(r=2),
    "lokr": lambda: LoKr(r=2),
    "oft": lambda: OFT(oft_block_size=8, r=0),
    "adalora": lambda: AdaLoRA(init_r=4, target_r=2, total_step=10),
}


@pytest.mark.parametrize("name", sorted(OTHER_METHODS))
def test_other_methods_train_under_dpo(name: str) -> None:
    """The reference of every method is its base model, and one DPO step moves the rewards."""
    torch.manual_seed(0)  # the methods' own random inits (LoRA-like factors) from a fixed state
    module = policy("dpo", method=OTHER_METHODS[name](), beta=0.5)
    b = batch(module)
    base = load_model("tiny:llama", tokenizer=module.tokenizer)
    with module.reference_policy():
        assert_close(token_logps(module.model, b)[0].sum(-1), _logps(base, b), rtol=1e-5, atol=1e-4)
    optimizer = torch.optim.SGD(module.trainable_parameters(), lr=1e-3)  # small: a first-order step
    before = module.preference_loss(b)[0]
    before.backward()
    optimizer.step()
    after = module.preference_loss(b)[0].detach()
    assert float(after) < float(before.detach())


class _Logged(L.Callback):
    def __init__(self) -> None:
        self.keys: set[str] = set()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.keys |= set(trainer.callback_metrics)


def test_a_bf16_fit_logs_loss_rewards_margin_accuracy_and_the_orpo_log_odds(tmp_path: Path) -> None:
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS * 2]
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, rows)
    module = PreferenceLM("tiny:llama", method=LoRA(r=4), loss="orpo", adapter_dir=str(tmp_path / "adapter"))
    data = PreferenceDataModule(str(path), val_fraction=0.34, batch_size=2, prompt_style="plain")
    logged = _Logged()
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[logged],
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=data)
    for key in [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margin",
        "rewards/accuracy",
        "log_odds_ratio",
    ]:
        assert f"train/{key}" in logged.keys, key
    assert {"val/loss", "val/rewards/accuracy"} <= set(trainer.callback_metrics)
    assert all(bool(torch.isfinite(v).all()) for v in trainer.callback_metrics.values())
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "kto"}, "model.init_args.loss: 'kto' is not allowed; one of dpo, ipo, orpo, simpo"),
        ({"beta": 0.0}, "model.init_args.beta: 0.0 is not allowed; a positive number"),
        ({"label_smoothing": 0.5}, "model.init_args.label_smoothing: 0.5 is not allowed; in [0, 0.5)"),
        ({"init_adapter": "/no/such/dir"}, "adapter directory '/no/such/dir' does not exist"),
    ],
)
def test_bad_settings_fail_with_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(LitPeftError) as e:
        PreferenceLM("tiny:llama", **kwargs)
    assert str(e.value) == message
