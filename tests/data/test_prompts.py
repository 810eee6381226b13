"""Each prompt style on one sample, the exact loss masks of a two-turn chat, and user-defined styles.

Expected texts are written out by hand; expected masks are computed from character spans of the full
text (the tokenizer's offset mapping), not with the segment logic under test.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from litpeft.data import prompts
from litpeft.data.collate import IGNORE_INDEX, encode
from litpeft.data.prompts import (
    STYLES,
    AlpacaStyle,
    ChatMLStyle,
    ChatTemplateStyle,
    Llama3Style,
    PlainStyle,
    PromptStyle,
    get_style,
    style_name,
)
from litpeft.errors import LitPeftError
from litpeft.models import tiny_tokenizer

EOS = "<|im_end|>"  # the tiny tokenizer's EOS
ALPACA_HEAD = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n"
)

TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a color"},
    {"role": "assistant", "content": "Blue"},
]

# style -> list of (text, carries loss) pieces of TWO_TURNS, written out by hand
TWO_TURN_TEXT: dict[str, list[tuple[str, bool]]] = {
    "chatml": [
        (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        ("Hello!<|im_end|>", True),
        ("\n<|im_start|>user\nName a color<|im_end|>\n<|im_start|>assistant\n", False),
        ("Blue<|im_end|>", True),
        ("\n", False),
    ],
    "llama-3": [
        (
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            False,
        ),
        ("Hello!<|eot_id|>", True),
        (
            "<|start_header_id|>user<|end_header_id|>\n\nName a color<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            False,
        ),
        ("Blue<|eot_id|>", True),
    ],
    "alpaca": [
        ("Be brief.\n\n### Instruction:\nHi there\n\n### Response:\n", False),
        ("Hello!" + EOS, True),
        ("\n\n### Instruction:\nName a color\n\n### Response:\n", False),
        ("Blue" + EOS, True),
    ],
    "plain": [
        ("Be brief.\nHi there\n", False),
        ("Hello!" + EOS, True),
        ("Name a color\n", False),
        ("Blue" + EOS, True),
    ],
}
# The tiny tokenizer's own template is ChatML: the same text and the same mask.
TWO_TURN_TEXT["chat_template"] = TWO_TURN_TEXT["chatml"]


def expected_encoding(
    tok: Any, pieces: list[tuple[str, bool]], all_loss: bool = False
) -> tuple[list[int], list[int]]:
    """Tokenize the whole text once; a token carries loss when its characters lie in a loss piece."""
    text = "".join(t for t, _ in pieces)
    spans, at = [], 0
    for t, loss in pieces:
        if loss:
            spans.append((at, at + len(t)))
        at += len(t)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        tid if all_loss or any(a <= s and e <= b for a, b in spans) else IGNORE_INDEX
        for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return enc["input_ids"], labels


@pytest.mark.parametrize("style", sorted(TWO_TURN_TEXT))
def test_two_turn_chat_exact_mask(tok: Any, style: str) -> None:
    ids, labels = expected_encoding(tok, TWO_TURN_TEXT[style])
    out = encode(TWO_TURNS, get_style(style, tok), tok)
    assert out["input_ids"] == ids
    assert out["labels"] == labels
    # Loss on both answers and their end-of-turn token, nothing else
    trained = tok.decode([t for t in out["labels"] if t != IGNORE_INDEX])
    end = "<|eot_id|>" if style == "llama-3" else EOS
    assert trained == f"Hello!{end}Blue{end}"


@pytest.mark.parametrize("style", sorted(TWO_TURN_TEXT))
def test_train_on_inputs_puts_loss_on_every_token(tok: Any, style: str) -> None:
    ids, labels = expected_encoding(tok, TWO_TURN_TEXT[style], all_loss=True)
    out = encode(TWO_TURNS, get_style(style, tok), tok, train_on_inputs=True)
    assert out["input_ids"] == ids and out["labels"] == labels


def test_alpaca_single_turn_with_and_without_input(tok: Any) -> None:
    msgs = [{"role": "user", "content": "Add 2 and 3", "input": ""}, {"role": "assistant", "content": "5"}]
    out = encode(msgs, get_style("alpaca"), tok)
    assert (
        tok.decode(out["input_ids"])
        == ALPACA_HEAD + "### Instruction:\nAdd 2 and 3\n\n### Response:\n5" + EOS
    )
    msgs[0]["input"] = "numbers"
    out = encode(msgs, get_style("alpaca"), tok)
    assert tok.decode(out["input_ids"]) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd 2 and 3\n\n### Input:\nnumbers\n\n### Response:\n5" + EOS
    )
    assert tok.decode([t for t in out["labels"] if t != IGNORE_INDEX]) == "5" + EOS


def test_auto_is_the_chat_template_when_there_is_one(tok: Any) -> None:
    assert type(get_style("auto", tok)) is ChatTemplateStyle
    bare = tiny_tokenizer()
    bare.chat_template = None
    assert get_style("auto", bare).name == "alpaca"
    with pytest.raises(LitPeftError, match="needs a tokenizer with a chat template"):
        encode(TWO_TURNS, get_style("chat_template"), bare)


def test_unknown_style_lists_the_choices() -> None:
    with pytest.raises(
        LitPeftError,
        match=r"unknown prompt_style 'vicuna'; choose one of: auto, alpaca, chat_template, chatml, llama-3, plain",
    ):
        get_style("vicuna")


@pytest.mark.parametrize("style", sorted(TWO_TURN_TEXT))
def test_generation_prompt_is_the_training_prefix(tok: Any, style: str) -> None:
    """Generation (tokenized without special tokens) sees exactly the ids training saw before the answer."""
    s = get_style(style, tok)
    out = encode(TWO_TURNS, s, tok)
    prompt_ids = tok(s.generation_prompt(TWO_TURNS[:-1], tok), add_special_tokens=False)["input_ids"]
    last_answer = tok("Blue", add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert out["input_ids"][:n] == prompt_ids
    assert out["input_ids"][n : n + len(last_answer)] == last_answer


def test_bos_is_prepended_when_the_tokenizer_adds_one() -> None:
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    assert tok("a")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds BOS itself
    msgs = TWO_TURNS[1:3]
    out = encode(msgs, get_style("chatml"), tok)
    assert out["input_ids"][0] == tok.bos_token_id and out["labels"][0] == IGNORE_INDEX
    assert out["input_ids"][1:] == encode(msgs, get_style("chatml"), tiny_tokenizer())["input_ids"]
    prompt = get_style("chatml").generation_prompt(msgs[:1], tok)
    assert prompt.startswith("<s><|im_start|>user")


class Vicuna(PromptStyle):
    """A user's style, registered by its name."""

    name: ClassVar[str] = "test-vicuna"
    appends_eos = False

    def segments(self, messages: list[dict[str, Any]], tokenizer: Any) -> list[tuple[str, bool]]:
        return [
            (f"USER: {m['content']}\nASSISTANT: ", False) if m["role"] == "user" else (m["content"], True)
            for m in messages
            if m["role"] != "system"
        ]


class Unnamed(Vicuna):
    """A subclass without a registered name: saved and found by its import path."""

    name: ClassVar[str] = ""


def test_user_styles_by_name_and_by_import_path(tok: Any) -> None:
    assert STYLES["test-vicuna"] is Vicuna
    s = get_style("test-vicuna")
    assert style_name(s) == "test-vicuna"
    out = encode(TWO_TURNS[1:3], s, tok)
    assert tok.decode(out["input_ids"]) == "USER: Hi there\nASSISTANT: Hello!" + EOS
    path = style_name(Unnamed())
    assert path.endswith(".Unnamed") and isinstance(get_style(path), Unnamed)
    with pytest.raises(LitPeftError, match=r"unknown prompt_style 'nowhere.Style'; built-in: alpaca, "):
        get_style("nowhere.Style")
    with pytest.raises(LitPeftError, match=r"'litpeft.data.Alpaca' is not a litpeft PromptStyle"):
        get_style("litpeft.data.Alpaca")  # the data source of that name, not the style


def test_style_classes_keep_their_saved_names_and_old_class_names() -> None:
    new = {
        "alpaca": AlpacaStyle,
        "chat_template": ChatTemplateStyle,
        "chatml": ChatMLStyle,
        "llama-3": Llama3Style,
        "plain": PlainStyle,
    }
    for short, cls in new.items():
        assert STYLES[short] is cls and style_name(cls()) == short and type(get_style(short)) is cls
    old = {"Alpaca": "alpaca", "ChatTemplate": "chat_template", "ChatML": "chatml", "Llama3": "llama-3"}
    for name, short in {**old, "Plain": "plain"}.items():
        with pytest.warns(FutureWarning, match=rf"prompts\.{name} moved to .*prompts\.{name}Style"):
            assert getattr(prompts, name) is new[short]
    with pytest.warns(FutureWarning):
        from litpeft.data.prompts import Alpaca
    assert Alpaca is AlpacaStyle
    with pytest.raises(AttributeError, match="has no attribute 'Vicuna'"):
        prompts.Vicuna  # noqa: B018
