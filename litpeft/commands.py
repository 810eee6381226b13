"""The commands that use a trained adapter: ``generate``, ``evaluate``, ``merge`` and ``export``.

litpeft generate --adapter runs/adapter --prompt "Name three colors."
litpeft generate --adapter runs/adapter                      # interactive chat, streamed
litpeft generate --adapter runs/adapter --input prompts.jsonl --output answers.jsonl
litpeft evaluate --adapter runs/adapter --data val.jsonl     # loss, perplexity, exact match, ROUGE-L
litpeft merge --adapter runs/adapter --output merged/        # plain transformers model directory
litpeft export --adapter runs/adapter --format peft --output peft/

Each command is a typed function; jsonargparse turns it into ``--help``, ``--config file.yaml`` and
``--print_config``. Nothing here knows a particular method: they go through ``PeftMethod``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from litpeft.data.collate import IGNORE_INDEX, encode, pad_batch
from litpeft.data.prompts import Message, PromptStyle, get_style, style_name
from litpeft.data.sources import AutoSource, BadRow
from litpeft.errors import LitPeftError
from litpeft.methods import PeftMethod

log = logging.getLogger(__name__)

Dtype = Literal["float32", "bfloat16", "float16"]


# -- loading ----------------------------------------------------------------------------------------
@dataclass
class Loaded:
    """A model ready for inference: the base alone, or the base with an adapter applied."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    style: PromptStyle
    base: str
    method: PeftMethod | None = None
    adapter: str | None = None


def _dtype(name: str | None) -> torch.dtype | None:
    return getattr(torch, name) if name else None


def _device(device: str) -> torch.device:
    return (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device == "auto"
        else torch.device(device)
    )


def load(
    adapter: str | None,
    model: str | None,
    dtype: str | None = None,
    device: str = "cpu",
    prompt_style: str | None = None,
    trust_remote_code: bool = False,
    allow_other_base: bool = False,
) -> Loaded:
    """The base model (``model``) or base + adapter (``adapter``; ``model`` then overrides its base path)."""
    from litpeft.adapter_dir import load_adapter, read_adapter_config
    from litpeft.models import load_model, load_tokenizer

    if adapter is None and model is None:
        raise LitPeftError("give --adapter DIR (a trained adapter) or --model SPEC (a base model)")
    if adapter is not None:
        meta = read_adapter_config(adapter)
        lm, tokenizer, method, style = load_adapter(
            adapter, model, _dtype(dtype), trust_remote_code, allow_other_base
        )
        if prompt_style is not None:
            style = get_style(prompt_style, tokenizer)
        loaded = Loaded(lm, tokenizer, style, model or meta["base_model"], method, str(adapter))
    else:
        tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        lm = load_model(model, _dtype(dtype), trust_remote_code=trust_remote_code, tokenizer=tokenizer)
        loaded = Loaded(lm, tokenizer, get_style(prompt_style or "auto", tokenizer), model)
    loaded.model.to(_device(device)).eval()
    return loaded


# -- prompts from files -----------------------------------------------------------------------------
def row_messages(row: Any, where: str) -> list[Message]:
    """A conversation to generate from: any training row format (:class:`AutoSource`) with the answer
    optional, or a bare ``{"prompt": ...}``."""
    other_formats = {"messages", "conversations", "instruction"}
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and not other_formats & row.keys():
        return [{"role": "user", "content": row["prompt"]}]
    return AutoSource().to_messages(row, where, need_answer=False)


def read_conversations(path: str, need_reference: bool = False) -> list[tuple[dict[str, Any], list[Message]]]:
    """Rows of a ``.jsonl``/``.json`` file and their conversations (each must have a user turn)."""
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


def prompt_part(messages: list[Message]) -> list[Message]:
    """The conversation up to (not including) its last assistant turn, if it ends with one."""
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


# -- generation -------------------------------------------------------------------------------------
def sampling_options(temperature: float, top_p: float) -> dict[str, Any]:
    if temperature < 0:
        raise LitPeftError(f"--temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise LitPeftError(f"--top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p}


def generate_batched(
    loaded: Loaded,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    progress: bool = False,
) -> list[str]:
    """``litpeft.generation.generate`` over prompts sorted by length (less padding), in the input order."""
    from litpeft.generation import generate

    lengths = [len(loaded.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    options = sampling_options(temperature, top_p)
    texts = generate(
        loaded.model,
        loaded.tokenizer,
        [prompts[i] for i in order],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        do_sample=options["do_sample"],
        temperature=temperature if options["do_sample"] else 1.0,
        top_p=top_p,
        progress=progress,
    )
    out = [""] * len(prompts)
    for i, text in zip(order, texts, strict=True):
        out[i] = text
    return out


def chat(
    loaded: Loaded,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    system: str | None = None,
    read: Callable[[str], str] = input,
) -> list[Message]:
    """An interactive multi-turn chat; each reply is streamed to stdout. Returns the conversation."""
    from transformers import TextStreamer

    model, tokenizer = loaded.model, loaded.tokenizer
    start = [{"role": "system", "content": system}] if system else []
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


def _encode_history(loaded: Loaded, history: list[Message], max_new_tokens: int) -> Any:
    """The chat so far, tokenized; the oldest exchanges are dropped when it would not fit the context."""
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    while True:
        prompt = loaded.style.generation_prompt(history, loaded.tokenizer)
        enc = loaded.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        first = 1 if history[0]["role"] == "system" else 0
        if limit is None or enc["input_ids"].shape[1] + max_new_tokens <= limit or len(history) - first < 3:
            return enc.to(loaded.model.device)
        del history[first : first + 2]
        print("[the oldest exchange was dropped to fit the context]", file=sys.stderr)


def _write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def generate(
    adapter: str | None = None,
    model: str | None = None,
    prompt: str | None = None,
    input: str | None = None,
    output: str | None = None,
    system: str | None = None,
    raw: bool = False,
    prompt_style: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 16,
    dtype: Dtype | None = None,
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_other_base: bool = False,
) -> None:
    """Generate text with a base model or a trained adapter.

    With ``--prompt``: one answer, printed. With ``--input``/``--output``: every row of a JSONL file
    (Alpaca rows, chat rows with ``messages``, or ``prompt`` rows), in batches; each output row is the
    input row plus ``generated``. With neither: an interactive chat that streams the answer.

    Args:
        adapter: adapter directory written by ``litpeft fit``.
        model: base model spec; with ``--adapter``, overrides the base path saved in the adapter.
        prompt: one user message to answer.
        input: JSONL/JSON file of prompts (needs ``--output``).
        output: JSONL file to write the answers to.
        system: system message put before every conversation.
        raw: use ``--prompt`` and ``prompt`` rows as plain text, without the prompt style.
        prompt_style: override the adapter's saved prompt style (default: the adapter's, else ``auto``).
        max_new_tokens: most tokens generated per answer.
        temperature: 0 decodes greedily; above 0 samples with this temperature.
        top_p: nucleus sampling threshold (with ``temperature`` > 0).
        seed: random seed for sampling.
        batch_size: prompts per generation batch (``--input``).
        dtype: load the model in this dtype (default float32).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...
        trust_remote_code: allow code from the model directory to run.
        allow_other_base: use the adapter on a base whose weights differ from the one it was trained on.
    """
    if input is not None and output is None:
        raise LitPeftError("--input needs --output (a JSONL file for the answers)")
    if output is not None and input is None:
        raise LitPeftError("--output needs --input (a JSONL file of prompts)")
    if prompt is not None and input is not None:
        raise LitPeftError("give either --prompt or --input, not both")
    sampling_options(temperature, top_p)  # fail before loading the model
    if max_new_tokens <= 0 or batch_size <= 0:
        raise LitPeftError("--max_new_tokens and --batch_size must be positive")
    rows = read_conversations(input) if input is not None else None
    loaded = load(adapter, model, dtype, device, prompt_style, trust_remote_code, allow_other_base)
    if seed is not None:
        torch.manual_seed(seed)
    head = [{"role": "system", "content": system}] if system else []

    def render(messages: list[Message], row: dict[str, Any] | None = None) -> str:
        if raw and len(messages) == 1 and (row is None or "prompt" in row):
            return messages[0]["content"]
        return loaded.style.generation_prompt(head + prompt_part(messages), loaded.tokenizer)

    if prompt is not None:
        text = generate_batched(
            loaded, [render([{"role": "user", "content": prompt}])], max_new_tokens, 1, temperature, top_p
        )
        print(text[0])
    elif rows is not None:
        prompts = [render(messages, row) for row, messages in rows]
        texts = generate_batched(
            loaded, prompts, max_new_tokens, batch_size, temperature, top_p, progress=True
        )
        _write_jsonl(output, [{**row, "generated": t} for (row, _), t in zip(rows, texts, strict=True)])
        log.info("wrote %d answers to %s", len(texts), output)
    else:
        chat(loaded, max_new_tokens, temperature, top_p, system)


# -- evaluation -------------------------------------------------------------------------------------
@torch.no_grad()
def token_metrics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    style: PromptStyle,
    conversations: Sequence[list[Message]],
    max_seq_length: int = 1024,
    batch_size: int = 8,
) -> dict[str, float]:
    """Next-token loss, perplexity and accuracy over the answer tokens (the prompt is masked as in training)."""
    samples = []
    for messages in conversations:
        s = encode(messages, style, tokenizer)
        s = {k: v[:max_seq_length] for k, v in s.items()}
        if any(t != IGNORE_INDEX for t in s["labels"][1:]):
            samples.append(s)
    if not samples:
        raise LitPeftError("no sample has answer tokens within max_seq_length")
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(0, len(samples), batch_size):
        batch = pad_batch(samples[i : i + batch_size], tokenizer.pad_token_id)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # A method that prepends virtual tokens returns logits for them too: keep the real positions.
        logits = logits[:, -batch["input_ids"].shape[1] :]
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        scores, target = logits[:, :-1][keep].float(), labels[keep]
        loss_sum += F.cross_entropy(scores, target, reduction="sum").item()
        correct += int((scores.argmax(-1) == target).sum())
        count += int(target.numel())
    loss = loss_sum / count
    return {"loss": loss, "perplexity": math.exp(loss), "token_accuracy": correct / count, "tokens": count}


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (Lin 2004): longest common subsequence of the lowercased alphanumeric words.

    torchmetrics' ``ROUGEScore`` with the ``rouge-score`` package's default tokenizer; ROUGE-L needs no
    NLTK data (only ``rougeLsum`` and the stemmer do).
    """
    from torchmetrics.text.rouge import ROUGEScore

    if not references:
        return float("nan")
    scores = ROUGEScore(rouge_keys="rougeL")(list(predictions), list(references))
    return float(scores["rougeL_fmeasure"])


def evaluate(
    data: str,
    adapter: str | None = None,
    model: str | None = None,
    output: str | None = None,
    predictions: str | None = None,
    prompt_style: str | None = None,
    limit: int | None = None,
    max_seq_length: int = 1024,
    batch_size: int = 8,
    generation: bool = True,
    max_new_tokens: int = 128,
    dtype: Dtype | None = None,
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_other_base: bool = False,
) -> dict[str, Any]:
    """Evaluate a trained adapter (or a base model) on a validation file; write a JSON summary.

    Loss, perplexity and token accuracy are computed on the answer tokens, as in training; exact match
    and ROUGE-L compare greedy generations with the reference answers.

    Args:
        data: validation file (JSONL/JSON): Alpaca rows with ``output``, or chat rows whose last
            message is the assistant's reference answer.
        adapter: adapter directory written by ``litpeft fit``.
        model: base model spec; with ``--adapter``, overrides the base path saved in the adapter.
        output: where to write the JSON summary (default: ``<adapter>/eval-<data name>.json``).
        predictions: also write each generation with its reference to this JSONL file.
        prompt_style: override the adapter's saved prompt style.
        limit: evaluate only the first ``limit`` rows.
        max_seq_length: truncate samples to this many tokens for the loss.
        batch_size: samples per batch (loss and generation).
        generation: compute the generation metrics (exact match, ROUGE-L).
        max_new_tokens: most tokens generated per answer.
        dtype: load the model in this dtype (default float32).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ...
        trust_remote_code: allow code from the model directory to run.
        allow_other_base: use the adapter on a base whose weights differ from the one it was trained on.
    """
    from litpeft.generation import exact_match

    if output is None and adapter is None:
        output_path = None
    else:
        output_path = Path(output) if output else Path(adapter) / f"eval-{Path(data).stem}.json"
    rows = read_conversations(data, need_reference=True)
    if limit is not None:
        rows = rows[:limit]
    loaded = load(adapter, model, dtype, device, prompt_style, trust_remote_code, allow_other_base)
    conversations = [m for _, m in rows]
    summary: dict[str, Any] = {
        "data": str(data),
        "samples": len(rows),
        "adapter": loaded.adapter,
        "base_model": loaded.base,
        "method": loaded.method.config() if loaded.method is not None else None,
        "prompt_style": style_name(loaded.style),
    }
    summary.update(
        token_metrics(loaded.model, loaded.tokenizer, loaded.style, conversations, max_seq_length, batch_size)
    )
    if generation:
        prompts = [loaded.style.generation_prompt(m[:-1], loaded.tokenizer) for m in conversations]
        refs = [m[-1]["content"] for m in conversations]
        preds = generate_batched(loaded, prompts, max_new_tokens, batch_size, progress=True)
        summary.update(
            exact_match=exact_match(preds, refs), rougeL=rouge_l(preds, refs), max_new_tokens=max_new_tokens
        )
        if predictions:
            _write_jsonl(
                predictions,
                [
                    {**row, "generated": p, "reference": r}
                    for (row, _), p, r in zip(rows, preds, refs, strict=True)
                ],
            )
    text = json.dumps(summary, indent=2)
    print(text)
    if output_path is not None:
        output_path.parent.mkdir(parents=True, exist_ok=True)
        output_path.write_text(text + "\n")
        log.info("evaluation summary written to %s", output_path)
    return summary


# -- merge and export -------------------------------------------------------------------------------
def _base_dtype(spec: str) -> torch.dtype:
    """The dtype the base checkpoint is stored in (float32 when it does not say)."""
    from transformers import AutoConfig

    from litpeft.models import resolve_spec

    if spec.startswith("tiny:"):
        return torch.float32
    try:
        config = AutoConfig.from_pretrained(resolve_spec(spec), local_files_only=True)
    except (OSError, ValueError):
        return torch.float32
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def merge(
    adapter: str,
    output: str,
    model: str | None = None,
    dtype: Dtype | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    allow_other_base: bool = False,
) -> None:
    """Fold a trained adapter into its base model and save a plain Hugging Face model directory.

    The result (safetensors weights, config, tokenizer and chat template) loads with
    ``transformers.AutoModelForCausalLM.from_pretrained(output)``; no litpeft needed. The merge is
    computed in float32 and cast to ``--dtype`` at the end.

    Args:
        adapter: adapter directory written by ``litpeft fit``.
        output: directory to write the merged model to.
        model: base model spec; overrides the base path saved in the adapter.
        dtype: dtype of the saved weights (default: the base checkpoint's).
        overwrite: replace a non-empty ``--output`` directory.
        trust_remote_code: allow code from the model directory to run.
        allow_other_base: merge into a base whose weights differ from the one the adapter was trained on.
    """
    from litpeft import export
    from litpeft.adapter_dir import read_adapter_config
    from litpeft.methods import method_from_config

    meta = read_adapter_config(adapter)
    export.check_mergeable(method_from_config(meta["method"]))
    export.check_output_dir(output, overwrite)
    loaded = load(adapter, model, "float32", "cpu", None, trust_remote_code, allow_other_base)
    rest = loaded.method.unmerged_part(loaded.model)
    merged = export.merge(loaded.model, loaded.method)
    target = _dtype(dtype) or _base_dtype(loaded.base)
    export.save_merged(merged, loaded.tokenizer, output, target, overwrite)
    print(f"merged model ({target}) written to {output}")
    if rest is not None:  # e.g. LLaMA-Adapter v2's gated prompts: an adapter of the merged model
        from litpeft.adapter_dir import write_adapter

        method, tensors = rest
        where = write_adapter(
            Path(output) / "adapter",
            str(Path(output).resolve()),
            merged.to(target),
            method,
            tensors,
            loaded.style,
        )
        print(f"the part of '{loaded.method.name}' that cannot be merged is an adapter of it: {where}")


def export_adapter(
    adapter: str,
    output: str,
    format: Literal["peft"] = "peft",
    model: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    allow_other_base: bool = False,
) -> None:
    """Export a trained adapter to another library's format.

    ``peft``: a Hugging Face peft directory (``adapter_config.json`` + ``adapter_model.safetensors``)
    that ``peft.PeftModel.from_pretrained(base_model, output)`` loads.

    Args:
        adapter: adapter directory written by ``litpeft fit``.
        output: directory to write to.
        format: target format.
        model: base model spec; overrides the base path saved in the adapter (and written as
            ``base_model_name_or_path``).
        overwrite: replace a non-empty ``--output`` directory.
        trust_remote_code: allow code from the model directory to run.
        allow_other_base: export against a base whose weights differ from the one it was trained on.
    """
    from litpeft import export
    from litpeft.adapter_dir import read_adapter_config, read_adapter_weights
    from litpeft.methods import method_from_config
    from litpeft.models import resolve_spec

    meta = read_adapter_config(adapter)
    export.check_exportable(method_from_config(meta["method"]))
    export.check_output_dir(output, overwrite)
    loaded = load(adapter, model, None, "cpu", None, trust_remote_code, allow_other_base)
    state = read_adapter_weights(adapter)
    base = resolve_spec(loaded.base)
    base = str(Path(base).resolve()) if Path(base).is_dir() else base  # a hub id or tiny:<arch> stays
    config, tensors = export.to_peft(loaded.model, loaded.method, state, base)
    export.save_peft(config, tensors, output, overwrite)
    print(f"{config['peft_type']} adapter in peft format written to {output}")


# -- the CLI entry points ---------------------------------------------------------------------------
def _run(function: Callable[..., Any], name: str) -> Callable[[list[str]], None]:
    def main(argv: list[str]) -> None:
        from jsonargparse import CLI

        CLI(function, args=argv, as_positional=False, prog=f"litpeft {name}")

    main.__doc__ = f"litpeft {name}: {function.__doc__.splitlines()[0] if function.__doc__ else ''}"
    return main


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "generate": _run(generate, "generate"),
    "evaluate": _run(evaluate, "evaluate"),
    "merge": _run(merge, "merge"),
    "export": _run(export_adapter, "export"),
}
