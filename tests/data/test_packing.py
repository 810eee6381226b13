"""Packing: several samples per row with attention kept inside each sample. The loss of a packed batch
equals the loss of the same samples run one by one (the reference, computed here from the model's
logits) and of the padded batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from litpeft.data.collate import IGNORE_INDEX, encode, pack_batch, pack_indices, pad_batch
from litpeft.data.prompts import get_style
from litpeft.module import PeftLM

CHATS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a color"},
        {"role": "assistant", "content": "Blue"},
        {"role": "user", "content": "Another"},
        {"role": "assistant", "content": "Red, of course"},
    ],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Spell cat"}, {"role": "assistant", "content": "c-a-t"}],
]


def reference_loss(model: Any, samples: list[dict[str, list[int]]]) -> float:
    """Mean next-token cross-entropy over all loss tokens, each sample run alone (no padding, no packing)."""
    total, count = 0.0, 0
    for s in samples:
        ids, labels = torch.tensor([s["input_ids"]]), torch.tensor(s["labels"])
        logits = model(input_ids=ids).logits[0, :-1]
        target = labels[1:]
        keep = target != IGNORE_INDEX
        total += F.cross_entropy(logits[keep].float(), target[keep], reduction="sum").item()
        count += int(keep.sum())
    return total / count


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_packed_loss_equals_unpacked(arch: str, train_on_inputs: bool) -> None:
    module = PeftLM(model=f"tiny:{arch}")
    module.configure_model()
    module.eval()
    tok = module.tokenizer
    samples = [encode(c, get_style("chatml"), tok, train_on_inputs) for c in CHATS]
    with torch.no_grad():
        ref = reference_loss(module.model, samples)
        padded, _, n_padded = module.loss_and_accuracy(pad_batch(samples, tok.pad_token_id))
        packed_batch = pack_batch([[samples[0], samples[1]], [samples[2], samples[3]]], tok.pad_token_id)
        assert "attention_mask" not in packed_batch
        packed, _, n_packed = module.loss_and_accuracy(packed_batch)
        # negative control: the same rows without per-sample positions let samples see each other
        leaky = {k: v for k, v in packed_batch.items() if k != "position_ids"}
        leaky_loss, _, _ = module.loss_and_accuracy(leaky)
    assert n_packed == n_padded
    assert padded.item() == pytest.approx(ref, abs=1e-5)
    assert packed.item() == pytest.approx(ref, abs=1e-5)
    assert abs(leaky_loss.item() - ref) > 1e-3


def test_pack_batch_layout(tok: Any) -> None:
    a = {"input_ids": [1, 2, 3], "labels": [1, 2, 3]}
    b = {"input_ids": [4, 5], "labels": [-100, 5]}
    c = {"input_ids": [6], "labels": [6]}
    batch = pack_batch([[a, b], [c]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 0, 0, 0, 0]]
    # the padding continues the last sample (which never sees it): no sample made of padding
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    # the first token of every sample is never a target (it would be predicted from the previous sample)
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, -100, -100, -100, -100]]


def test_pack_indices_fits_every_sample_once() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 100, (300,), generator=g).tolist()
    rows = pack_indices(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert all(row == sorted(row) for row in rows)
    # far fewer rows than samples, and not more than twice the ideal count
    ideal = -(-sum(lengths) // 128)
    assert ideal <= len(rows) <= 2 * ideal
    assert pack_indices(lengths, 128) == rows  # deterministic
