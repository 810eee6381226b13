"""Prompt styles: how a conversation becomes text, split into segments that do or do not carry loss.

A sample is a list of messages ``{"role": "system"|"user"|"assistant", "content": str}``; Alpaca rows
become one user message (with the row's ``input`` kept under ``"input"``) and one assistant message.
A style returns ``[(text, is_assistant), ...]``; tokenizing segment by segment makes the loss mask exact.

Styles (short name: class): ``alpaca``: :class:`AlpacaStyle`, ``chatml``: :class:`ChatMLStyle`,
``llama-3``: :class:`Llama3Style`, ``plain``: :class:`PlainStyle` and ``chat_template``:
:class:`ChatTemplateStyle` (the tokenizer's own template, the default when it has one). The classes end
in ``Style``, so the Alpaca *style* is not confused with the Alpaca *data source*
:class:`litpeft.data.Alpaca`. A style is saved with the adapter by its short name (:func:`style_name`)
and found again by :func:`get_style`. To add one, subclass :class:`PromptStyle`, set ``name`` and
implement ``segments``::

    class VicunaStyle(PromptStyle):
        name = "vicuna"
        appends_eos = False  # the tokenizer's EOS token is added after each answer

        def segments(self, messages, tokenizer):
            return [(f"USER: {m['content']}\nASSISTANT: ", False) if m["role"] == "user"
                    else (m["content"], True) for m in messages if m["role"] != "system"]

and set ``data.prompt_style: my_package.styles.VicunaStyle`` (an import path) in the config.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, ClassVar

from transformers import PreTrainedTokenizerBase

from litpeft.errors import LitPeftError
from litpeft.registry import class_name, resolve_class

Message = dict[str, Any]
STYLES: dict[str, type[PromptStyle]] = {}


class PromptStyle:
    """Base class. Subclass, set ``name`` and implement :meth:`segments`; the style registers itself."""

    name: ClassVar[str] = ""
    #: Whether the style's own text ends each assistant turn (``<|im_end|>``, ``<|eot_id|>``). When it
    #: does not, :func:`~litpeft.data.collate.encode` appends the tokenizer's EOS token to each answer.
    appends_eos: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            STYLES[cls.name] = cls

    def segments(self, messages: list[Message], tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
        raise NotImplementedError

    def generation_prompt(self, messages: list[Message], tokenizer: PreTrainedTokenizerBase) -> str:
        """Text to generate the next assistant turn from (``messages`` ends with a user turn).

        It starts with the tokenizer's BOS text where training puts a BOS token, so that tokenizing it
        without special tokens gives the same ids as training did.
        """
        segments = self.segments([*messages, {"role": "assistant", "content": ""}], tokenizer)
        last = max(i for i, (_, is_assistant) in enumerate(segments) if is_assistant)
        eos = "" if self.appends_eos else (tokenizer.eos_token or "")  # as encode() adds it after answers
        text = "".join(t + (eos if is_assistant else "") for t, is_assistant in segments[:last])
        bos = bos_text(tokenizer)
        return text if text.startswith(bos) else bos + text

    def fingerprint(self) -> str:
        """What the tokenization cache keys on: the style's name, settings and code."""
        parts = [style_name(self), repr(sorted(vars(self).items()))]
        for cls in type(self).__mro__:
            if issubclass(cls, PromptStyle):
                try:
                    parts.append(inspect.getsource(cls))
                except (OSError, TypeError):
                    parts.append(cls.__qualname__)
        return "\n".join(parts)

    @staticmethod
    def user_text(message: Message) -> str:
        extra = message.get("input")
        return message["content"] + (f"\n\n{extra}" if extra else "")


class AlpacaStyle(PromptStyle):
    """The Stanford Alpaca template (with and without an ``### Input:`` section).

    A system message takes the place of the template's opening sentence; later turns of a multi-turn
    sample follow as further ``### Instruction:``/``### Response:`` pairs.
    """

    name = "alpaca"
    appends_eos = False
    HEADER = "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request.\n\n"

    def segments(self, messages: list[Message], tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
        out: list[tuple[str, bool]] = []
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        for m in messages:
            if m["role"] == "user":
                extra = m.get("input")
                if not out:
                    ctx = ", paired with an input that provides further context" if extra else ""
                    lead = system + "\n\n" if system else self.HEADER.format(ctx=ctx)
                else:
                    lead = "\n\n"
                body = f"### Instruction:\n{m['content']}\n\n" + (f"### Input:\n{extra}\n\n" if extra else "")
                out.append((lead + body + "### Response:\n", False))
            elif m["role"] == "assistant":
                out.append((m["content"], True))
        return out


class PlainStyle(PromptStyle):
    """No template: user text, a newline, then the response."""

    name = "plain"
    appends_eos = False

    def segments(self, messages: list[Message], tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
        return [
            (self.user_text(m) + "\n", False) if m["role"] != "assistant" else (m["content"], True)
            for m in messages
        ]


class ChatMLStyle(PromptStyle):
    """ChatML (``<|im_start|>role\n...<|im_end|>``), as SmolLM2, Qwen and OpenAI's chat models use it."""

    name = "chatml"

    def segments(self, messages: list[Message], tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
        out: list[tuple[str, bool]] = []
        for m in messages:
            if m["role"] == "assistant":
                out += [
                    ("<|im_start|>assistant\n", False),
                    (m["content"] + "<|im_end|>", True),
                    ("\n", False),
                ]
            else:
                out.append((f"<|im_start|>{m['role']}\n{self.user_text(m)}<|im_end|>\n", False))
        return out


class Llama3Style(PromptStyle):
    """The Llama 3 instruct format (header ids, ``<|eot_id|>`` ends a turn; BOS comes from the tokenizer)."""

    name = "llama-3"

    def segments(self, messages: list[Message], tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
        out: list[tuple[str, bool]] = []
        for m in messages:
            header = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
            if m["role"] == "assistant":
                out += [(header, False), (m["content"] + "<|eot_id|>", True)]
            else:
                out.append((header + self.user_text(m) + "<|eot_id|>", False))
        return out


class ChatTemplateStyle(PromptStyle):
    """The tokenizer's own chat template (``tokenizer.chat_template``), rendered turn by turn."""

    name = "chat_template"

    def segments(self, messages: list[Message], tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
        if not tokenizer.chat_template:
            raise LitPeftError(
                "prompt_style 'chat_template' needs a tokenizer with a chat template; use 'alpaca'"
            )
        msgs = [
            {"role": m["role"], "content": self.user_text(m) if m["role"] == "user" else m["content"]}
            for m in messages
        ]
        out: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise LitPeftError(
                    "the tokenizer's chat template does not render turns as prefixes of each other; "
                    "choose another prompt_style"
                )
            answer = full[len(prompt) :]
            # The loss stops at the end-of-turn token; what the template adds after it is not the answer.
            eos = tokenizer.eos_token
            cut = answer.find(eos) + len(eos) if eos and eos in answer else len(answer)
            out += [(prompt[len(done) :], False), (answer[:cut], True)]
            if answer[cut:]:
                out.append((answer[cut:], False))
            done = full
        return out

    def generation_prompt(self, messages: list[Message], tokenizer: PreTrainedTokenizerBase) -> str:
        msgs = [
            {"role": m["role"], "content": self.user_text(m) if m["role"] == "user" else m["content"]}
            for m in messages
        ]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        bos = bos_text(tokenizer)
        return text if text.startswith(bos) else bos + text


def bos_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids a tokenizer puts before text when it adds special tokens (usually ``[bos]`` or ``[]``)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def bos_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """:func:`bos_ids` as text (``""`` for tokenizers that add nothing)."""
    return tokenizer.decode(bos_ids(tokenizer)) if bos_ids(tokenizer) else ""


def get_style(style: str | PromptStyle, tokenizer: PreTrainedTokenizerBase | None = None) -> PromptStyle:
    """A style by name; ``auto`` is the tokenizer's chat template when it has one, else Alpaca.

    A name with a dot is a user's subclass, saved by its import path (see :func:`style_name`).
    """
    if isinstance(style, PromptStyle):
        return style
    if style == "auto":
        style = "chat_template" if tokenizer is not None and tokenizer.chat_template else "alpaca"
    if "." not in style and style not in STYLES:  # the choices include "auto", which is no class
        raise LitPeftError(
            f"unknown prompt_style '{style}'; choose one of: auto, {', '.join(sorted(STYLES))}"
        )
    return resolve_class(style, STYLES, PromptStyle, "prompt_style")()


def style_name(style: PromptStyle) -> str:
    """Name under which a style is saved with an adapter (its short name, or its import path)."""
    return class_name(type(style), STYLES)


#: old class name -> new one; the old names stay importable for one release, with a FutureWarning
_RENAMED = {
    "Alpaca": "AlpacaStyle",
    "Plain": "PlainStyle",
    "ChatML": "ChatMLStyle",
    "Llama3": "Llama3Style",
    "ChatTemplate": "ChatTemplateStyle",
}


def __getattr__(name: str) -> type[PromptStyle]:
    if name not in _RENAMED:
        raise AttributeError(f"module '{__name__}' has no attribute '{name}'")
    new = _RENAMED[name]
    warnings.warn(
        f"{__name__}.{name} moved to {__name__}.{new}; the old path goes in the next release",
        FutureWarning,
        stacklevel=2,
    )
    return globals()[new]
