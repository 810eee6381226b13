"""Each preference loss, its rewards and its gradients equal TRL's on a fixed batch (tiny model, LoRA).

TRL 1.16 is the oracle: DPO and IPO through ``DPOTrainer.compute_loss`` (its own tokenization, collator,
fused log-prob head and a separately loaded reference model), ORPO through ``ORPOTrainer`` and SimPO and
conservative DPO through ``CPOTrainer`` (full logits, their ``get_batch_logps``). The policy's LoRA tensors
carry seeded noise, so no log-ratio is zero.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from preference_helpers import PAIRS, batch, grads, policy, trl_rows
from torch.testing import assert_close
from trl import DPOConfig, DPOTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from litpeft.models import load_model

N = len(PAIRS)


def _args(cls: type, tmp_path: Path, **kwargs):
    # bf16=False: TRL prepares the reference with accelerate, which would wrap its forward in bf16 autocast
    return cls(
        output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, save_strategy="no", **kwargs
    )


def _trainer(cls: type, config: type, module, tmp_path: Path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extra = (
            {"ref_model": load_model("tiny:llama", tokenizer=module.tokenizer)} if cls is DPOTrainer else {}
        )
        return cls(
            model=module.model,
            args=_args(config, tmp_path, **kwargs),
            train_dataset=Dataset.from_list(trl_rows()),
            processing_class=module.tokenizer,
            **extra,
        )


def _split(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """litpeft's ``[chosen; rejected]`` batch in the layout of TRL's ORPO/CPO trainers."""
    return {
        f"{side}_{key}": b[name][rows]
        for side, rows in (("chosen", slice(0, N)), ("rejected", slice(N, None)))
        for key, name in (
            ("input_ids", "input_ids"),
            ("attention_mask", "attention_mask"),
            ("labels", "labels"),
        )
    }


def _assert_grads_close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """Equal to float32 round-off (the paths differ in summation order: chunked vs whole, mask vs none)."""
    assert ours.keys() == theirs.keys() and ours
    scale = max(float(g.abs().max()) for g in theirs.values())
    assert scale > 0
    for name in ours:
        assert_close(ours[name], theirs[name], rtol=1e-3, atol=1e-5 * scale, msg=name)


def test_pairs_are_tokenized_and_masked_as_trl_masks_them(tmp_path: Path) -> None:
    """Prompt tokens and padding carry no label; the answer and its EOS do (TRL's completion_mask)."""
    module = policy()
    trainer = _trainer(DPOTrainer, DPOConfig, module, tmp_path)
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(N)])
    ours = batch(module)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert torch.equal(ours["labels"] != -100, theirs["completion_mask"].bool())
    assert torch.equal(ours["labels"][ours["labels"] != -100], ours["input_ids"][ours["labels"] != -100])


@pytest.mark.parametrize(("loss", "trl_loss", "beta"), [("dpo", "sigmoid", 0.1), ("ipo", "ipo", 0.5)])
def test_dpo_and_ipo_equal_trl_dpo_trainer(tmp_path: Path, loss: str, trl_loss: str, beta: float) -> None:
    module = policy(loss, beta=beta)
    trainer = _trainer(DPOTrainer, DPOConfig, module, tmp_path, beta=beta, loss_type=[trl_loss])
    ours, out, logps = module.preference_loss(batch(module))
    ours.backward()
    our_grads = grads(module)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(N)])
    theirs = trainer.compute_loss(trainer.model, trl_batch)
    theirs.backward()
    assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    _assert_grads_close(our_grads, grads(module))
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    mine = module.metrics(out, logps)
    for key, trl_key in [
        ("rewards/chosen", "rewards/chosen"),
        ("rewards/rejected", "rewards/rejected"),
        ("rewards/margin", "rewards/margins"),
        ("rewards/accuracy", "rewards/accuracies"),
        ("logps/chosen", "logps/chosen"),
        ("logps/rejected", "logps/rejected"),
    ]:
        assert float(mine[key]) == pytest.approx(metrics[trl_key], rel=1e-4, abs=1e-6), key
    assert float(out.chosen_rewards.abs().max()) > 1e-3  # the policy is not its reference


def test_dpo_label_smoothing_equals_trl_conservative_sigmoid(tmp_path: Path) -> None:
    """cDPO: TRL's CPO sigmoid loss (with label smoothing) on the log-ratios to a separately loaded base."""
    module = policy("dpo", beta=0.1, label_smoothing=0.2)
    b = batch(module)
    ours, out, _ = module.preference_loss(b)
    ours.backward()
    our_grads = grads(module)
    trainer = _trainer(
        CPOTrainer, CPOConfig, module, tmp_path, beta=0.1, loss_type="sigmoid", label_smoothing=0.2
    )
    base = load_model("tiny:llama", tokenizer=module.tokenizer)
    inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    with torch.no_grad():
        ref = CPOTrainer.get_batch_logps(base(**inputs).logits, b["labels"])
    ratios = CPOTrainer.get_batch_logps(module.model(**inputs).logits, b["labels"]) - ref
    losses, chosen_rewards, rejected_rewards = trainer.cpo_loss(ratios[:N], ratios[N:])
    losses.mean().backward()
    assert_close(ours, losses.mean(), rtol=1e-5, atol=1e-6)
    assert_close(out.chosen_rewards, chosen_rewards, rtol=1e-4, atol=1e-6)
    assert_close(out.rejected_rewards, rejected_rewards, rtol=1e-4, atol=1e-6)
    _assert_grads_close(our_grads, grads(module))


@pytest.mark.parametrize("sft_on_prompt", [True, False])
def test_orpo_equals_trl_orpo_trainer(tmp_path: Path, sft_on_prompt: bool) -> None:
    """With ``sft_on_prompt`` the whole loss is TRL's; without, TRL's odds-ratio term plus the NLL of the
    chosen answers alone (transformers' own loss on litpeft's labels)."""
    module = policy("orpo", beta=0.1, sft_on_prompt=sft_on_prompt)
    b = batch(module)
    ours, out, logps = module.preference_loss(b)
    ours.backward()
    our_grads = grads(module)
    trainer = _trainer(ORPOTrainer, ORPOConfig, module, tmp_path, beta=0.1)
    theirs, metrics = trainer.get_batch_loss_metrics(module.model, _split(b))
    if not sft_on_prompt:
        chosen = {k: b[k][:N] for k in ("input_ids", "attention_mask", "labels")}
        chosen_logps, rejected_logps, *_ = trainer.concatenated_forward(module.model, _split(b))
        odds_ratio_term = trainer.odds_ratio_loss(chosen_logps, rejected_logps)[0].mean()
        theirs = module.model(**chosen).loss - odds_ratio_term
    theirs.backward()
    assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    _assert_grads_close(our_grads, grads(module))
    mine = module.metrics(out, logps)
    for key, trl_key in [
        ("rewards/chosen", "rewards/chosen"),
        ("rewards/rejected", "rewards/rejected"),
        ("rewards/margin", "rewards/margins"),
        ("rewards/accuracy", "rewards/accuracies"),
        ("log_odds_ratio", "log_odds_ratio"),
        ("log_odds_chosen", "log_odds_chosen"),
    ] + ([("nll", "nll_loss")] if sft_on_prompt else []):
        assert float(mine[key]) == pytest.approx(metrics[trl_key], rel=1e-4, abs=1e-6), key


def test_simpo_equals_trl_cpo_trainer(tmp_path: Path) -> None:
    module = policy("simpo", beta=2.0, simpo_gamma=0.5, label_smoothing=0.1)
    b = batch(module)
    ours, out, logps = module.preference_loss(b)
    ours.backward()
    our_grads = grads(module)
    trainer = _trainer(
        CPOTrainer,
        CPOConfig,
        module,
        tmp_path,
        beta=2.0,
        loss_type="simpo",
        simpo_gamma=0.5,
        cpo_alpha=0.0,
        label_smoothing=0.1,
    )
    theirs, metrics = trainer.get_batch_loss_metrics(module.model, _split(b))
    theirs.backward()
    assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    _assert_grads_close(our_grads, grads(module))
    mine = module.metrics(out, logps)
    assert float(mine["rewards/chosen"]) == pytest.approx(metrics["rewards/chosen"], rel=1e-4)
    assert float(mine["rewards/margin"]) == pytest.approx(metrics["rewards/margins"], rel=1e-4, abs=1e-6)
    assert float(mine["rewards/accuracy"]) == pytest.approx(metrics["rewards/accuracies"])
