"""Prompt styles: how a conversation becomes text, split into segments that do or do not carry loss.

A sample is a list of messages ``{"role": "system"|"user"|"assistant", "content": str}``; Alpaca rows
become one user message (with the row's ``input`` kept under ``"input"``) and one assistant message.
A style returns ``[(text, is_assistant), ...]``; tokenizing segment by segment makes the loss mask exact.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PreTrainedTokenizerBase

from litpeft.errors import LitPeftError

Message = dict[str, Any]
STYLES: dict[str, type[PromptStyle]] = {}


class PromptStyle:
    """Base class. Subclass, set ``name`` and implement :meth:`segments`; the style registers itself."""

    name: ClassVar[str] = ""
    #: Whether the style's text ends each assistant turn with the tokenizer's EOS token itself.
    appends_eos: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            STYLES[cls.name] = cls

    def segments(self, messages: list[Message], tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
        raise NotImplementedError

    def generation_prompt(self, messages: list[Message], tokenizer: PreTrainedTokenizerBase) -> str:
        """Text to generate the next assistant turn from (``messages`` ends with a user turn)."""
        return "".join(
            text
            for text, _ in self.segments([*messages, {"role": "assistant", "content": ""}], tokenizer)[:-1]
        )

    @staticmethod
    def user_text(message: Message) -> str:
        extra = message.get("input")
        return message["content"] + (f"\n\n{extra}" if extra else "")


class Alpaca(PromptStyle):
    """The Stanford Alpaca template (with and without an ``### Input:`` section)."""

    name = "alpaca"
    appends_eos = False
    HEADER = "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request.\n\n"

    def segments(self, messages: list[Message], tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
        out: list[tuple[str, bool]] = []
        for m in messages:
            if m["role"] == "user":
                extra = m.get("input")
                header = self.HEADER.format(
                    ctx=", paired with an input that provides further context" if extra else ""
                )
                body = f"### Instruction:\n{m['content']}\n\n" + (f"### Input:\n{extra}\n\n" if extra else "")
                out.append(((header if not out else "\n\n") + body + "### Response:\n", False))
            elif m["role"] == "assistant":
                out.append((m["content"], True))
            elif m["role"] == "system":
                out.append((m["content"] + "\n\n", False))
        return out


class Plain(PromptStyle):
    """No template: user text, a newline, then the response."""

    name = "plain"
    appends_eos = False

    def segments(self, messages: list[Message], tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
        return [
            (self.user_text(m) + "\n", False) if m["role"] != "assistant" else (m["content"], True)
            for m in messages
        ]


class ChatTemplate(PromptStyle):
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
            out += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        return out

    def generation_prompt(self, messages: list[Message], tokenizer: PreTrainedTokenizerBase) -> str:
        msgs = [
            {"role": m["role"], "content": self.user_text(m) if m["role"] == "user" else m["content"]}
            for m in messages
        ]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def get_style(style: str | PromptStyle, tokenizer: PreTrainedTokenizerBase | None = None) -> PromptStyle:
    """A style by name; ``auto`` is the tokenizer's chat template when it has one, else Alpaca."""
    if isinstance(style, PromptStyle):
        return style
    if style == "auto":
        style = "chat_template" if tokenizer is not None and tokenizer.chat_template else "alpaca"
    if "." in style:  # a user's subclass, saved by import path
        import importlib

        module, _, name = style.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise LitPeftError(f"cannot import prompt style '{style}'") from e
        if not (isinstance(cls, type) and issubclass(cls, PromptStyle)):
            raise LitPeftError(f"'{style}' is not a PromptStyle")
        return cls()
    if style not in STYLES:
        raise LitPeftError(
            f"unknown prompt_style '{style}'; choose one of: auto, {', '.join(sorted(STYLES))}"
        )
    return STYLES[style]()


def style_name(style: PromptStyle) -> str:
    """Name under which a style is saved with an adapter (its short name, or its import path)."""
    cls = type(style)
    return cls.name if STYLES.get(cls.name) is cls else f"{cls.__module__}.{cls.__qualname__}"
