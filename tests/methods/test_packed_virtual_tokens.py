"""Packing with the soft-prompt methods: a packed row gives every sample exactly the logits and loss it
gets alone (issue #16, defect 1). Prompt tuning and P-tuning put their virtual tokens before *every*
packed sample, with positions that restart per sample; prefix tuning and P-tuning v2 need nothing."""

from __future__ import annotations

from collections.abc import Callable

import method_helpers as helpers
import pytest
import torch

from litpeft.data.collate import encode, pack_batch, pad_batch
from litpeft.data.prompts import get_style
from litpeft.methods import PeftMethod, PrefixTuning, PromptTuning, PTuning, PTuningV2
from litpeft.module import PeftLM

CHATS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}],
    [
        {"role": "user", "content": "Name a color"},
        {"role": "assistant", "content": "Blue"},
        {"role": "user", "content": "Another"},
        {"role": "assistant", "content": "Red, of course"},
    ],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Spell cat"}, {"role": "assistant", "content": "c-a-t"}],
    [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}],
]
ROWS = [[0, 1], [2, 3, 4], [3]]  # rows of different lengths: a padding tail in two of them
ASSISTANT = "<|im_start|>assistant\n"

METHODS: dict[str, Callable[[], PeftMethod]] = {  # built per test
    "prompt_tuning": lambda: PromptTuning(num_virtual_tokens=4),
    "p_tuning": lambda: PTuning(num_virtual_tokens=4, encoder="mlp"),
    "p_tuning_split": lambda: PTuning(
        num_virtual_tokens=4, placement="split", num_before=1, split_marker=ASSISTANT, tokenizer="tiny:llama"
    ),
    "p_tuning_template": lambda: PTuning(
        num_virtual_tokens=6,
        placement="template",
        template=[
            {"tokens": 2},
            {"tokens": 1, "after": "<|im_start|>user\n"},
            {"tokens": 2, "anchor": "?", "before": "<|im_end|>"},
            {"tokens": 1, "after": ASSISTANT, "occurrence": "last"},
        ],
        tokenizer="tiny:llama",
    ),
    "prefix_tuning": lambda: PrefixTuning(num_virtual_tokens=4),
    "p_tuning_v2": lambda: PTuningV2(num_virtual_tokens=4),
}


def batch_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A packed batch's model inputs; with ``use_cache=False`` (as the loss calls the model): with a cache,
    transformers does not look for packed samples in the position ids."""
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}


def samples(tok) -> list[dict[str, list[int]]]:
    return [encode(c, get_style("chatml"), tok) for c in CHATS]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("name", list(METHODS))
def test_each_packed_sample_gets_its_logits_alone(arch, name, tok):
    model = helpers.seeded_model(arch, tok, METHODS[name](), noise=0.5).eval()
    data = samples(tok)
    batch = pack_batch([[data[i] for i in row] for row in ROWS], tok.pad_token_id)
    with torch.no_grad():
        packed = model(**batch_inputs(batch), use_cache=False).logits
        for r, row in enumerate(ROWS):
            at = 0
            for i in row:
                ids = torch.tensor([data[i]["input_ids"]])
                alone = model(input_ids=ids).logits[0]
                got = packed[r, at : at + ids.shape[1]]
                torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5, msg=f"row {r}, sample {i}")
                at += ids.shape[1]


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning", "p_tuning_template", "prefix_tuning"])
def test_packed_loss_equals_the_padded_loss(name, tok):
    """Through PeftLM's loss: the labels stay aligned with the real tokens (virtual ones carry none)."""
    module = PeftLM(model="tiny:llama", method=METHODS[name]())
    module.configure_model()
    module.eval()
    data = samples(module.tokenizer)
    with torch.no_grad():
        for p in module.trainable_parameters():
            p.add_(0.5 * torch.randn_like(p))
        padded, _, n_padded = module.loss_and_accuracy(pad_batch(data, module.tokenizer.pad_token_id))
        rows = [[data[i] for i in row] for row in ([0, 1], [2, 3, 4])]
        packed, _, n_packed = module.loss_and_accuracy(pack_batch(rows, module.tokenizer.pad_token_id))
    assert n_packed == n_padded  # each sample's first token is a prompt token: no target lost
    assert packed.item() == pytest.approx(padded.item(), abs=1e-5)
