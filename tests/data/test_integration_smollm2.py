"""The real SmolLM2-135M-Instruct tokenizer and chat template (a BPE tokenizer with a default system
prompt): exact loss masks of a two-turn chat, computed from character spans of the rendered text."""

from __future__ import annotations

import os
from typing import Any

import pytest

from litpeft.data.collate import IGNORE_INDEX, encode
from litpeft.data.prompts import get_style

# The autouse fixture gives each test a private cache; this test reuses the converted model instead.
USER_CACHE = os.environ.get("LITPEFT_CACHE")

CHAT = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a color"},
    {"role": "assistant", "content": "Blue"},
]


@pytest.mark.integration
def test_smollm2_chat_template_two_turn_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    if USER_CACHE:
        monkeypatch.setenv("LITPEFT_CACHE", USER_CACHE)
    else:
        monkeypatch.delenv("LITPEFT_CACHE")
    from litpeft.models import load_tokenizer

    tok: Any = load_tokenizer("smollm2-135m-instruct")
    style = get_style("auto", tok)
    assert style.name == "chat_template"
    text = tok.apply_chat_template(CHAT, tokenize=False)
    spans = []
    for answer in ("Hello! How can I help?<|im_end|>", "Blue<|im_end|>"):
        start = text.index(answer, spans[-1][1] if spans else 0)
        spans.append((start, start + len(answer)))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    expected = [
        t if any(a <= s and e <= b for a, b in spans) else IGNORE_INDEX
        for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    out = encode(CHAT, style, tok)
    assert out["input_ids"] == enc["input_ids"]
    assert out["labels"] == expected
    prompt = tok(style.generation_prompt(CHAT[:-1], tok), add_special_tokens=False)["input_ids"]
    assert out["input_ids"][: len(prompt)] == prompt
