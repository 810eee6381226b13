"""The next-token objective: the head at loss positions only must give what the model's own forward gives."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config

from litpeft.loss import IGNORE_INDEX, answer_logits, token_loss
from litpeft.models import load_model


def _gemma2_with_softcap() -> torch.nn.Module:
    """A tiny Gemma 2 whose final soft-cap (tanh(z / c) * c) is small enough to change every logit."""
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=260,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=0.5,
        attn_implementation="eager",
    )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    "build", [lambda: load_model("tiny:llama"), _gemma2_with_softcap], ids=["llama", "gemma2"]
)
def test_answer_logits_are_the_models_own_logits_at_loss_positions(build) -> None:
    model = build()
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    labels[1, :9] = IGNORE_INDEX
    with torch.no_grad():
        logits, targets = answer_logits(model, {"input_ids": ids, "labels": labels})
        full = model(input_ids=ids).logits[:, :-1]
    keep = labels[:, 1:] != IGNORE_INDEX
    assert logits.shape == (int(keep.sum()), full.shape[-1])
    torch.testing.assert_close(logits, full[keep], rtol=1e-5, atol=1e-5)
    assert torch.equal(targets, ids[:, 1:][keep])


def test_token_loss_is_cross_entropy_and_counts_correct_tokens() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    targets = torch.tensor([0, 1, 0])
    loss, correct = token_loss(logits, targets, reduction="sum")
    probs = logits.softmax(-1)
    expected = -(probs[0, 0].log() + probs[1, 1].log() + probs[2, 0].log())
    torch.testing.assert_close(loss, expected)
    assert int(correct) == 2
