"""The commands that use a trained adapter (``generate``, ``evaluate``, ``merge``, ``export``) and ``download``.

litpeft generate --adapter runs/adapter --prompt "Name three colors."
litpeft generate --adapter runs/adapter                      # interactive chat, streamed
litpeft generate --adapter runs/adapter --input prompts.jsonl --output answers.jsonl
litpeft evaluate --adapter runs/adapter --data val.jsonl     # loss, perplexity, exact match, ROUGE-L
litpeft evaluate --adapter runs/adapter --tasks arc_easy,hellaswag --limit 200   # lm-evaluation-harness
litpeft merge --adapter runs/adapter --output merged/        # plain transformers model directory
litpeft export --adapter runs/adapter --format peft --output peft/
litpeft download Qwen/Qwen2.5-0.5B-Instruct                 # prefetch a hub model (or hub://org/dataset)
litpeft serve --adapter a=runs/a/adapter --adapter b=runs/b/adapter  # OpenAI-compatible API (litpeft.serve)

Each command is a typed function; jsonargparse turns it into ``--help``, ``--config file.yaml`` and
``--print_config``. A command checks its arguments, then delegates: loading and generation to
:mod:`litpeft.inference`, metrics to :mod:`litpeft.evaluation`, merging and exporting to
:mod:`litpeft.export`. Nothing here knows a particular method.
"""

from __future__ import annotations

import json
import logging
from argparse import ArgumentError
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import CLI

from litpeft import export, hub, inference
from litpeft.adapter_dir import read_adapter_config, read_adapter_weights, write_adapter
from litpeft.data.prompts import Message
from litpeft.data.readers import HUB_DATASET_FILES
from litpeft.deprecation import moved_names
from litpeft.errors import LitPeftError, parse_error_line
from litpeft.evaluation import evaluate_conversations
from litpeft.files import atomic_path, check_output_file, check_writable, write_jsonl
from litpeft.inference import (
    Dtype,
    load_for_inference,
    parse_device,
    parse_dtype,
    read_conversations,
    sampling_options,
)
from litpeft.methods import method_from_config
from litpeft.models import checkpoint_dtype, hub_ref, resolve_spec
from litpeft.serve.server import adapter_flags, serve

log = logging.getLogger(__name__)


def _positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise LitPeftError(f"--{name} must be positive, got {value}")


# -- generate ---------------------------------------------------------------------------------------
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
    overwrite: bool = False,
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
        overwrite: replace an existing ``--output`` file.
    """
    if input is not None and output is None:
        raise LitPeftError("--input needs --output (a JSONL file for the answers)")
    if output is not None and input is None:
        raise LitPeftError("--output needs --input (a JSONL file of prompts)")
    if prompt is not None and input is not None:
        raise LitPeftError("give either --prompt or --input, not both")
    sampling_options(temperature, top_p)  # fail before loading the model
    _positive(max_new_tokens=max_new_tokens, batch_size=batch_size)
    parse_dtype(dtype)
    parse_device(device)
    check_output_file(output, overwrite)
    rows = read_conversations(input) if input is not None else None
    loaded = load_for_inference(
        adapter, model, dtype, device, prompt_style, trust_remote_code, allow_other_base
    )
    if seed is not None:
        torch.manual_seed(seed)
    head: list[Message] = [{"role": "system", "content": system}] if system else []

    def render(messages: list[Message], row: dict[str, Any] | None = None) -> str:
        if raw and len(messages) == 1 and (row is None or "prompt" in row):
            return messages[0]["content"]
        prompts, _ = inference.split_for_generation([messages], need_reference=False)
        return loaded.prompt(head + prompts[0])

    def answers(prompts: list[str], batch: int, progress: bool = False) -> list[str]:
        return inference.generate(
            loaded.model,
            loaded.tokenizer,
            prompts,
            max_new_tokens,
            batch,
            temperature=temperature,
            top_p=top_p,
            progress=progress,
        )

    if prompt is not None:
        print(answers([render([{"role": "user", "content": prompt}])], 1)[0])
    elif rows is not None:
        texts = answers([render(messages, row) for row, messages in rows], batch_size, progress=True)
        write_jsonl(output, [{**row, "generated": t} for (row, _), t in zip(rows, texts, strict=True)])
        log.info("wrote %d answers to %s", len(texts), output)
    else:
        inference.chat(loaded, max_new_tokens, temperature, top_p, system)


# -- evaluate ---------------------------------------------------------------------------------------
def evaluate(
    data: str | None = None,
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
    overwrite: bool = False,
    tasks: str | None = None,
    num_fewshot: int | None = None,
) -> dict[str, Any]:
    """Evaluate a trained adapter (or a base model) on a validation file or benchmarks; write a JSON summary.

    ``--data``: loss, perplexity and token accuracy on the answer tokens, as in training; exact match and
    ROUGE-L compare greedy generations with the reference answers. ``--tasks``: EleutherAI's
    lm-evaluation-harness, in process on base + adapter (:mod:`litpeft.harness`; ``pip install
    'litpeft[eval]'``).

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
        overwrite: replace an existing ``--output`` or ``--predictions`` file (the default summary file in
            the adapter directory is always replaced).
        tasks: lm-eval tasks instead of ``--data``: comma-separated names (``arc_easy,hellaswag``), globs
            or task YAML files; the results go to ``<adapter>/lm_eval-<tasks>.json`` (or ``--output``).
            ``--limit`` counts each task's documents; ``--batch_size``, ``--dtype``, ``--device`` apply.
        num_fewshot: few-shot examples per prompt with ``--tasks`` (default: each task's own).
    """
    if (data is None) == (tasks is None):
        raise LitPeftError(
            "give --data FILE (loss, exact match, ROUGE-L) or --tasks NAMES (lm-eval), one of them"
        )
    _positive(
        limit=limit, max_seq_length=max_seq_length, batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    parse_dtype(dtype)
    parse_device(device)
    check_output_file(output, overwrite)
    if tasks is not None:
        if predictions is not None or prompt_style is not None:
            raise LitPeftError(
                "--predictions and --prompt_style go with --data; lm-eval tasks bring their own prompts"
            )
        from litpeft import harness  # lm-eval: optional (the eval extra) and slow to import

        return harness.evaluate_tasks(
            tasks, adapter, model, output, limit, num_fewshot, batch_size, dtype, device,
            trust_remote_code, allow_other_base,
        )  # fmt: skip
    if num_fewshot is not None:
        raise LitPeftError("--num_fewshot goes with --tasks (lm-eval benchmarks)")
    assert data is not None
    if output is None and adapter is None:
        output_path = None
    else:
        output_path = Path(output) if output else Path(adapter) / f"eval-{Path(data).stem}.json"
    check_output_file(predictions, overwrite, "--predictions")
    if output_path is not None and output is None:
        check_writable(output_path.parent, f"evaluation summary '{output_path}': its directory")
    rows = read_conversations(data, need_reference=True)
    if limit is not None:
        rows = rows[:limit]
    loaded = load_for_inference(
        adapter, model, dtype, device, prompt_style, trust_remote_code, allow_other_base
    )
    summary, preds, refs = evaluate_conversations(
        loaded, [m for _, m in rows], max_seq_length, batch_size, generation, max_new_tokens
    )
    summary = {"data": str(data), **summary}
    if predictions and generation:
        rows_out = [
            {**row, "generated": p, "reference": r} for (row, _), p, r in zip(rows, preds, refs, strict=True)
        ]
        write_jsonl(predictions, rows_out)
    text = json.dumps(summary, indent=2)
    print(text)
    if output_path is not None:
        with atomic_path(output_path) as tmp:
            tmp.write_text(text + "\n")
        log.info("evaluation summary written to %s", output_path)
    return summary


# -- merge and export -------------------------------------------------------------------------------
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
    meta = read_adapter_config(adapter)
    export.check_mergeable(method_from_config(meta["method"]))
    parse_dtype(dtype)
    export.check_output_dir(output, overwrite, export.MERGED_FILES)
    loaded = load_for_inference(adapter, model, "float32", "cpu", None, trust_remote_code, allow_other_base)
    rest = loaded.method.unmerged_part(loaded.model)
    merged = export.merge(loaded.model, loaded.method)
    target = parse_dtype(dtype) or checkpoint_dtype(loaded.base)
    export.save_merged(merged, loaded.tokenizer, output, target, overwrite)
    print(f"merged model ({target}) written to {output}")
    if rest is not None:  # e.g. LLaMA-Adapter v2's gated prompts: an adapter of the merged model
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
    meta = read_adapter_config(adapter)
    export.check_exportable(method_from_config(meta["method"]))
    export.check_output_dir(output, overwrite, export.PEFT_FILES)
    loaded = load_for_inference(adapter, model, None, "cpu", None, trust_remote_code, allow_other_base)
    state = read_adapter_weights(adapter)
    ref = hub_ref(loaded.base)
    if ref is not None:  # peft downloads the base itself: the repo id and the pinned revision
        base, revision = ref.repo_id, ref.revision
    else:
        base, revision = resolve_spec(loaded.base), None
        base = str(Path(base).resolve()) if Path(base).is_dir() else base  # tiny:<arch> stays
    config, tensors = export.to_peft(loaded.model, loaded.method, state, base, revision)
    export.save_peft(config, tensors, output, overwrite)
    print(f"{config['peft_type']} adapter in peft format written to {output}")


# -- download ---------------------------------------------------------------------------------------
def download(
    repo_id: str,
    revision: str | None = None,
    include: list[str] | str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Download a hub model (``org/name``) or dataset (``hub://org/name``) into the Hugging Face cache.

    A model brings the files a causal LM needs (config, tokenizer, safetensors weights, generation
    config); a dataset its data files. Later runs then work offline (``HF_HUB_OFFLINE=1``).

    Args:
        repo_id: ``org/name[@revision]`` (a model) or ``hub://org/name[@revision]`` (a dataset).
        revision: branch, tag or commit (default ``main``; or write ``@revision`` after the id).
        include: file pattern(s) to fetch instead of the default ones, e.g. ``'*.gguf'`` or
            ``'[README.md, "*.json"]'``.
        trust_remote_code: also fetch a model repo's own code (``*.py``).
    """
    include = [include] if isinstance(include, str) else include
    ref = hub.parse_ref(repo_id, revision)
    if ref.repo_type == "dataset":
        path = hub.download(ref, include or hub.dataset_patterns(ref, HUB_DATASET_FILES))
    else:
        path = hub.download_model(ref, trust_remote_code, include)
    print(f"{ref.what} (commit {path.name}) is in {path}")
    return path


# -- the CLI entry points ---------------------------------------------------------------------------
def _run(
    function: Callable[..., Any],
    name: str,
    positional: bool = False,
    rewrite: Callable[[list[str]], list[str]] | None = None,
) -> Callable[[list[str]], None]:
    def main(argv: list[str]) -> None:
        args = rewrite(argv) if rewrite else argv
        try:
            CLI(function, args=args, as_positional=positional, prog=f"litpeft {name}", exit_on_error=False)
        except ArgumentError as e:  # one line naming the flag, as the Trainer commands do
            line = parse_error_line(str(e))
            raise LitPeftError(line if line.startswith(("unrecognized", "--")) else "--" + line) from None

    main.__doc__ = f"litpeft {name}: {function.__doc__.splitlines()[0] if function.__doc__ else ''}"
    return main


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "generate": _run(generate, "generate"),
    "evaluate": _run(evaluate, "evaluate"),
    "merge": _run(merge, "merge"),
    "export": _run(export_adapter, "export"),
    "download": _run(download, "download", positional=True),
    "serve": _run(serve, "serve", rewrite=adapter_flags),
}

# Helpers that lived here before they moved (deprecated, for one release).
__getattr__ = moved_names(
    __name__,
    {
        "chat": "litpeft.inference",
        "row_messages": "litpeft.inference",
        "rouge_l": "litpeft.evaluation",
    },
)
