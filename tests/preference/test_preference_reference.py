"""``precompute_reference``: the cached reference log-probabilities give the losses and gradients of the
reference pass they replace, are keyed by pair (any order, any batch size), refuse reference-free losses,
follow ``init_adapter``, and survive a resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adapter_helpers import make_adapter
from preference_helpers import grads, pairs, policy
from test_preference_module import _logps
from torch.testing import assert_close

from litpeft.data.prompts import PlainStyle
from litpeft.errors import LitPeftError
from litpeft.methods import LoRA
from litpeft.models import load_model
from litpeft.preference import PreferenceLM
from litpeft.preference.data import PairSamples, collate_pairs, encode_pairs


def _pairs(module: PreferenceLM) -> PairSamples:
    return PairSamples(encode_pairs(pairs(), PlainStyle(), module.tokenizer))


def _loss_and_grads(module: PreferenceLM, batch: dict, split: str | None) -> tuple[torch.Tensor, dict]:
    loss, out, _ = module.preference_loss(batch, split)
    loss.backward()
    return torch.stack([loss.detach(), *out.chosen_rewards, *out.rejected_rewards]), grads(module)


def _no_reference_pass(*args, **kwargs):
    raise AssertionError("the reference policy ran although its log-probabilities are cached")


def _assert_cache_replaces_the_reference_pass(module: PreferenceLM, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = _pairs(module)
    module.cache_reference("train", dataset, batch_size=2)  # other batches, other padding than the step's
    tok = module.tokenizer
    batch = collate_pairs([dataset[i] for i in (2, 0, 1)], tok.pad_token_id)  # shuffled
    assert batch["pair_index"].tolist() == [2, 0, 1]
    expected, expected_grads = _loss_and_grads(module, batch, None)  # the reference pass each step
    with monkeypatch.context() as m:
        m.setattr(module, "reference_logps", _no_reference_pass)
        cached, cached_grads = _loss_and_grads(module, batch, "train")
    assert_close(cached, expected, rtol=1e-5, atol=1e-5)
    assert expected_grads.keys() == cached_grads.keys()
    for name, g in expected_grads.items():
        assert float(g.abs().max()) > 0, name
        assert_close(cached_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_cached_reference_gives_the_losses_and_gradients_of_the_reference_pass(
    loss: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = policy(loss, precompute_reference=True)
    _assert_cache_replaces_the_reference_pass(module, monkeypatch)
    # and the cache holds the base model's own log-probabilities, by pair index
    dataset = _pairs(module)
    base = load_model("tiny:llama", tokenizer=module.tokenizer)
    batch = collate_pairs([dataset[i] for i in range(len(dataset))], module.tokenizer.pad_token_id)
    assert_close(
        module.reference_cache.logps["train"].T.reshape(-1), _logps(base, batch), rtol=1e-5, atol=1e-4
    )


def test_with_init_adapter_the_cache_holds_the_starting_adapters_log_probs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sft = make_adapter(tmp_path / "sft", "tiny:llama", LoRA(r=4, alpha=8, dropout=0.0), style="plain")
    module = PreferenceLM(
        "tiny:llama",
        method=LoRA(r=4, alpha=8, dropout=0.0),
        init_adapter=str(sft),
        precompute_reference=True,
    )
    module.configure_model()
    with torch.no_grad():  # the policy has moved away from its start when the cache is scored
        for p in module.trainable_parameters():
            p.add_(0.2)
    _assert_cache_replaces_the_reference_pass(module, monkeypatch)
    from litpeft.adapter_dir import load_adapter

    dataset = _pairs(module)
    batch = collate_pairs([dataset[i] for i in range(len(dataset))], module.tokenizer.pad_token_id)
    sft_logps = _logps(load_adapter(sft)[0], batch)
    assert_close(module.reference_cache.logps["train"].T.reshape(-1), sft_logps, rtol=1e-5, atol=1e-4)


def test_the_cache_is_rescored_when_the_data_is_not_what_it_was_scored_on() -> None:
    module = policy("dpo", precompute_reference=True)
    dataset = _pairs(module)
    module.cache_reference("train", dataset, batch_size=2)
    restored = module.reference_cache.state_dict()  # as a checkpoint holds it
    module.reference_cache.load_state_dict(restored)
    module.cache_reference("train", dataset, batch_size=3)  # the same data: kept
    assert module.reference_cache.logps["train"] is restored["train"]["logps"]
    encoded = encode_pairs(pairs(), PlainStyle(), module.tokenizer)
    other = PairSamples([encoded[1], encoded[0]])  # other pairs at the same indices
    module.cache_reference("train", other, batch_size=2)
    assert_close(
        module.reference_cache.logps["train"], restored["train"]["logps"][[1, 0]], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("loss", ["orpo", "simpo"])
def test_reference_free_losses_refuse_precompute_reference_in_one_line(loss: str) -> None:
    with pytest.raises(LitPeftError) as e:
        PreferenceLM("tiny:llama", loss=loss, precompute_reference=True)
    assert str(e.value) == (
        f"model.init_args.precompute_reference: loss '{loss}' is reference-free; "
        "only dpo and ipo have reference log-probabilities to precompute"
    )


def test_without_a_preference_datamodule_the_cache_cannot_be_scored() -> None:
    module = policy("dpo", precompute_reference=True)
    dataset = _pairs(module)
    batch = collate_pairs([dataset[0]], module.tokenizer.pad_token_id)
    with pytest.raises(LitPeftError, match="^model.init_args.precompute_reference needs the pairs of a"):
        module.preference_loss(batch, "train")
