"""Inference with a base model or a trained adapter: loading, batched generation, an interactive chat.

The ``generate``/``evaluate`` commands, the exact-match callback and (later) a server build on this::

    loaded = load_for_inference(adapter="runs/adapter", device="auto")
    prompts = [loaded.prompt(m) for m in split_for_generation(conversations, need_reference=False)[0]]
    answers = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=64)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tqdm import tqdm
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from litpeft.adapter_dir import load_adapter, read_adapter_config
from litpeft.data.prompts import Message, PromptStyle, get_style
from litpeft.data.sources import AutoSource, BadRow
from litpeft.errors import LitPeftError
from litpeft.methods import PeftMethod
from litpeft.models import load_model, load_tokenizer

#: The dtypes a model can be loaded in for inference (``None``: float32).
Dtype = Literal["float32", "bfloat16", "float16"]


# -- loading ----------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model ready for inference: the base alone, or the base with an adapter applied."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    style: PromptStyle
    base: str
    method: PeftMethod | None = None
    adapter: str | None = None

    def prompt(self, messages: list[Message]) -> str:
        """The conversation formatted in this model's prompt style, ready for the assistant's answer."""
        return self.style.generation_prompt(messages, self.tokenizer)


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``None`` stays ``None`` (the loader's default)."""
    return getattr(torch, name) if name else None


def parse_device(device: str) -> torch.device:
    """A torch device; ``auto`` is CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise LitPeftError(
            f"--device '{device}' is not a device; use auto, cpu, cuda or cuda:<index>"
        ) from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise LitPeftError(f"--device '{device}': no CUDA device is available here (use cpu or auto)")
    return parsed


def load_for_inference(
    adapter: str | None,
    model: str | None,
    dtype: str | None = None,
    device: str = "cpu",
    prompt_style: str | None = None,
    trust_remote_code: bool = False,
    allow_other_base: bool = False,
) -> LoadedModel:
    """The base model (``model``) or base + adapter (``adapter``; ``model`` then overrides its base path),
    on ``device`` in eval mode. ``prompt_style`` overrides the adapter's saved style (default ``auto``)."""
    if adapter is None and model is None:
        raise LitPeftError("give --adapter DIR (a trained adapter) or --model SPEC (a base model)")
    if adapter is not None:
        meta = read_adapter_config(adapter)
        lm, tokenizer, method, style = load_adapter(
            adapter, model, parse_dtype(dtype), trust_remote_code, allow_other_base
        )
        if prompt_style is not None:
            style = get_style(prompt_style, tokenizer)
        loaded = LoadedModel(lm, tokenizer, style, model or meta["base_model"], method, str(adapter))
    else:
        assert model is not None
        tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        lm = load_model(model, parse_dtype(dtype), trust_remote_code=trust_remote_code, tokenizer=tokenizer)
        loaded = LoadedModel(lm, tokenizer, get_style(prompt_style or "auto", tokenizer), model)
    loaded.model.to(parse_device(device)).eval()
    return loaded


# -- prompts from files -----------------------------------------------------------------------------
def row_messages(row: Any, where: str) -> list[Message]:
    """A conversation to generate from: any training row format (:class:`AutoSource`) with the answer
    optional, or a bare ``{"prompt": ...}``. ``where`` (``file:line``) starts any error message."""
    other_formats = {"messages", "conversations", "instruction"}
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and not other_formats & row.keys():
        return [{"role": "user", "content": row["prompt"]}]
    return AutoSource().to_messages(row, where, need_answer=False)


def read_conversations(path: str, need_reference: bool = False) -> list[tuple[dict[str, Any], list[Message]]]:
    """Rows of a ``.jsonl``/``.json`` file and their conversations (each must have a user turn;
    with ``need_reference``, end with the assistant's reference answer)."""
    out = []
    for where, row in AutoSource().rows(path):
        if isinstance(row, BadRow):
            raise LitPeftError(str(row))
        messages = row_messages(row, where)
        if not any(m["role"] == "user" for m in messages):
            raise LitPeftError(f"{where}: the conversation has no user message")
        if need_reference and messages[-1]["role"] != "assistant":
            raise LitPeftError(f"{where}: needs a reference answer ('output', or a last assistant message)")
        out.append((row, messages))
    if not out:
        raise LitPeftError(f"'{path}' has no rows")
    return out


def split_for_generation(
    conversations: Sequence[list[Message]], need_reference: bool = True
) -> tuple[list[list[Message]], list[str | None]]:
    """Each conversation as the prompt to answer and the reference answer.

    The reference is the last assistant turn and the prompt is everything before it. With
    ``need_reference=False`` a conversation that does not end with an assistant turn is a prompt as a
    whole (its reference is ``None``); otherwise a conversation without an assistant turn is an error.
    """
    prompts: list[list[Message]] = []
    refs: list[str | None] = []
    for messages in conversations:
        if not need_reference and (not messages or messages[-1]["role"] != "assistant"):
            prompts.append(list(messages))
            refs.append(None)
            continue
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise LitPeftError("a conversation has no assistant turn to use as the reference answer")
        prompts.append(messages[: turns[-1]])
        refs.append(messages[turns[-1]]["content"])
    return prompts, refs


# -- generation -------------------------------------------------------------------------------------
def sampling_options(temperature: float = 0.0, top_p: float = 1.0) -> dict[str, Any]:
    """``model.generate`` keyword arguments: greedy for ``temperature`` 0, else nucleus sampling."""
    if temperature < 0:
        raise LitPeftError(f"--temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise LitPeftError(f"--top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p}


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    progress: bool = False,
    longest_first: bool = True,
    stop: Sequence[str] = (),
) -> list[str]:
    """Complete already-formatted ``prompts``; return the new text of each, in the input order.

    Prompts are generated in left-padded batches of ``batch_size``, longest first (similar lengths share
    a batch: less padding) unless ``longest_first=False`` (batches in the input order). A prompt's greedy
    answer can differ in the last bits with the padding its batch needs, so a fixed figure (the demo's)
    keeps one batching. ``temperature`` 0 decodes greedily (see :func:`sampling_options`). A prompt's
    answer also ends at the first of the ``stop`` strings it contains (the text returned still holds
    it). The tokenizer's padding side and the model's train/eval mode are restored afterwards.
    """
    options = sampling_options(temperature, top_p)
    if stop:
        options |= {"stop_strings": list(stop), "tokenizer": tokenizer}
    order = list(range(len(prompts)))
    if longest_first:
        lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        order.sort(key=lambda i: -lengths[i])
    side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    model.eval()
    texts: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generating", unit="prompt") if progress else None
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            enc = tokenizer(
                [prompts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(model.device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **options,
            )
            new = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(chunk, new, strict=True):
                texts[i] = text
            if bar is not None:
                bar.update(len(chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
        if bar is not None:
            bar.close()
    return texts


# -- the interactive chat ---------------------------------------------------------------------------
def chat(
    loaded: LoadedModel,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    system: str | None = None,
    read: Callable[[str], str] = input,
) -> list[Message]:
    """An interactive multi-turn chat; each reply is streamed to stdout. Returns the conversation.

    ``/reset`` clears the history, ``/exit`` or end of input quits, Ctrl-C stops the current answer.
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    start: list[Message] = [{"role": "system", "content": system}] if system else []
    history = list(start)
    options = sampling_options(temperature, top_p)
    print("chat: /reset clears the history, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            text = read(">> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            break
        if text == "/exit":
            break
        if text == "/reset":
            history = list(start)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        enc = _encode_history(loaded, history, max_new_tokens)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    streamer=streamer,
                    **options,
                )
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            print("\n[interrupted]", file=sys.stderr)
            history.pop()
            continue
        reply = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})
    return history


def _encode_history(loaded: LoadedModel, history: list[Message], max_new_tokens: int) -> BatchEncoding:
    """The chat so far, tokenized; the oldest exchanges are dropped when it would not fit the context."""
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    while True:
        enc = loaded.tokenizer(loaded.prompt(history), return_tensors="pt", add_special_tokens=False)
        first = 1 if history[0]["role"] == "system" else 0
        if limit is None or enc["input_ids"].shape[1] + max_new_tokens <= limit or len(history) - first < 3:
            return enc.to(loaded.model.device)
        del history[first : first + 2]
        print("[the oldest exchange was dropped to fit the context]", file=sys.stderr)


__all__ = [
    "Dtype",
    "LoadedModel",
    "chat",
    "generate",
    "load_for_inference",
    "parse_device",
    "parse_dtype",
    "read_conversations",
    "row_messages",
    "sampling_options",
    "split_for_generation",
]
