"""Helpers of the preference tests: a tiny LoRA policy that differs from its base, fixed pairs."""

from __future__ import annotations

import torch

from litpeft.data.prompts import PlainStyle
from litpeft.methods import LoRA, PeftMethod
from litpeft.preference import PreferenceLM
from litpeft.preference.data import PreferencePair, collate_pairs, encode_pairs

#: prompt, chosen, rejected: answers of different lengths, so padding and length normalisation matter
PAIRS = [
    ("Name a fruit.", "An apple.", "A stone, which is not a fruit at all."),
    ("Say hi", "Hello there, friend!", "no"),
    ("Count to three.", "1, 2, 3", "one two"),
]


def pairs() -> list[PreferencePair]:
    return [
        PreferencePair(
            [{"role": "user", "content": p}],
            {"role": "assistant", "content": c},
            {"role": "assistant", "content": r},
        )
        for p, c, r in PAIRS
    ]


def trl_rows() -> list[dict[str, str]]:
    """The same pairs as TRL's plain-text rows: the prompt as the plain style renders it."""
    return [{"prompt": p + "\n", "chosen": c, "rejected": r} for p, c, r in PAIRS]


def policy(loss: str = "dpo", method: PeftMethod | None = None, seed: int = 0, **kwargs) -> PreferenceLM:
    """A ``tiny:llama`` PreferenceLM whose trainable tensors carry seeded noise (so the policy is not its
    reference: a zero-init LoRA would make every log-ratio 0 and pass any comparison)."""
    module = PreferenceLM("tiny:llama", method=method or LoRA(r=4, alpha=8, dropout=0.0), loss=loss, **kwargs)
    module.configure_model()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def batch(module: PreferenceLM) -> dict[str, torch.Tensor]:
    """The pairs as litpeft's data layer batches them (plain prompt style)."""
    tok = module.tokenizer
    return collate_pairs(encode_pairs(pairs(), PlainStyle(), tok), tok.pad_token_id)


def grads(module: PreferenceLM) -> dict[str, torch.Tensor]:
    """The trainable tensors' gradients (cloned), then zeroed."""
    out = {}
    for n, p in module.model.named_parameters():
        if p.requires_grad:
            out[n] = p.grad.clone()
            p.grad = None
    return out
