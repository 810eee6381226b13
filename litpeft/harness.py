"""``litpeft evaluate --tasks``: EleutherAI's lm-evaluation-harness on a base model + adapter, in process.

    litpeft evaluate --adapter runs/adapter --tasks arc_easy,hellaswag --limit 200
    litpeft evaluate --adapter runs/adapter --tasks my_task.yaml     # a local task in lm-eval's YAML format

:class:`HarnessLM` is an lm-eval model over the model :func:`litpeft.inference.load_for_inference` loads:
the base with the adapter applied, unmerged, so every method (the virtual-token ones included) and
quantized bases run as they do in ``generate``. Its requests follow lm-eval's own Hugging Face model
(``lm_eval.models.huggingface.HFLM``): the same tokenization, truncation from the left and rolling
windows, so a merged adapter scores the same under both. Scores come from
:func:`litpeft.loss.answer_logits` (the training objective's path: the LM head only at the scored
positions, virtual positions already removed), generations from :func:`litpeft.inference.generate`.

lm-eval is optional (``pip install 'litpeft[eval]'``); importing this module without it is a one-line
error.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from litpeft.data.collate import pad_batch
from litpeft.errors import LitPeftError
from litpeft.files import atomic_path, check_writable
from litpeft.inference import LoadedModel, generate, load_for_inference
from litpeft.loss import IGNORE_INDEX, answer_logits
from litpeft.methods.layout import max_positions

try:
    from lm_eval import evaluator
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import (
        get_rolling_token_windows,
        handle_non_serializable,
        make_disjoint_window,
        make_table,
    )
except ImportError as e:
    raise LitPeftError(f"--tasks needs lm-eval: pip install 'litpeft[eval]' ({e})") from None

log = logging.getLogger(__name__)

#: lm-eval's context length for a model whose config names none (``HFLM``'s default).
DEFAULT_MAX_LENGTH = 2048


class HarnessLM(TemplateLM):
    """An lm-eval model (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``) over a loaded
    base + adapter, in batches of ``batch_size`` requests.

    ``max_length`` (lm-eval's name) is the context a request may fill: the model's positions less the
    method's virtual tokens, less one, because a scored sequence is fed whole (its last token is only a
    target), where ``HFLM`` drops that token first. It behaves as ``HFLM(max_length=lm.max_length)``.
    """

    def __init__(self, loaded: LoadedModel, batch_size: int = 8) -> None:
        super().__init__()
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self.batch_size = batch_size
        self._device = loaded.model.device
        positions = max_positions(loaded.model)
        if positions >= 1 << 62:
            positions = DEFAULT_MAX_LENGTH
        virtual = getattr(loaded.method, "num_virtual_tokens", 0) if loaded.method is not None else 0
        self.max_length = positions - virtual - 1
        self.max_gen_toks = 256  # HFLM's default for a task that sets none

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and each rolling window's first) is conditioned on: BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The tokenizer's own special tokens (a BOS) unless asked otherwise or ``string`` starts with them."""
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **options)

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records as the model in its results' ``config``."""
        method = self.loaded.method
        return {
            "adapter": self.loaded.adapter,
            "base_model": self.loaded.base,
            "method": method.config() if method is not None else None,
            "max_length": self.max_length,
        }

    # -- scoring --------------------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **_: Any,
    ) -> list[tuple[float, bool]]:
        return self._score([(context, continuation) for _, context, continuation in requests], disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """log p(text), each token predicted once, in windows of ``max_length`` (lm-eval's rolling windows)."""
        windows: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        for k, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1):
                windows.append(make_disjoint_window(window))
                owners.append(k)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owners, self._score(windows, disable_tqdm), strict=True):
            totals[k] += logprob
        return totals

    @torch.no_grad()
    def _score(
        self, pairs: Sequence[tuple[list[int], list[int]]], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | context), whether greedy decoding gives the continuation)`` per pair.

        Longest first, right-padded without a mask (causal attention keeps the padding from every scored
        position, as in training), the context cut from the left to fit ``max_length + 1`` tokens.
        """
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        bar = tqdm(total=len(pairs), desc="loglikelihood", disable=disable_tqdm)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            samples = [self._sample(*pairs[i]) for i in chunk]
            batch = pad_batch(samples, self.tokenizer.pad_token_id)
            batch = {k: v.to(self.device) for k, v in batch.items() if k != "attention_mask"}
            logits, targets = answer_logits(self.model, batch)
            logprobs = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
            rows = (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero()[:, 0]
            sums = torch.zeros(len(chunk), dtype=torch.float64, device=rows.device)
            sums.index_add_(0, rows, logprobs.double())
            misses = torch.zeros(len(chunk), dtype=torch.long, device=rows.device)
            misses.index_add_(0, rows, (logits.argmax(-1) != targets).long())
            for j, i in enumerate(chunk):
                results[i] = (float(sums[j]), bool(misses[j] == 0))
            bar.update(len(chunk))
        bar.close()
        return results

    def _sample(self, context: list[int], continuation: list[int]) -> dict[str, list[int]]:
        if not continuation or len(continuation) > self.max_length:
            raise LitPeftError(
                f"a continuation of {len(continuation)} tokens cannot be scored in a context of "
                f"{self.max_length} tokens"
            )
        ids = (context + continuation)[-(self.max_length + 1) :]
        labels = [IGNORE_INDEX] * (len(ids) - len(continuation)) + continuation
        return {"input_ids": ids, "labels": labels}

    # -- generation -----------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation up to the first of its ``until`` strings (or EOS, or
        ``max_gen_toks``); requests with the same generation settings share batches."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        texts = [""] * len(requests)
        for members in groups.values():
            options = dict(requests[members[0]].args[1])
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new_tokens = int(options.pop("max_gen_toks", options.pop("max_new_tokens", self.max_gen_toks)))
            sample = bool(options.get("do_sample", False))
            prompts = [self._prompt(requests[i].args[0], new_tokens) for i in members]
            answers = generate(
                self.model,
                self.tokenizer,
                prompts,
                new_tokens,
                self.batch_size,
                temperature=float(options.get("temperature", 1.0)) if sample else 0.0,
                top_p=float(options.get("top_p", 1.0)),
                progress=not disable_tqdm,
                stop=[s for s in until if s],
            )
            for i, answer in zip(members, answers, strict=True):
                for stop in until:
                    answer = answer.split(stop)[0] if stop else answer
                texts[i] = answer
        return texts

    def _prompt(self, context: str, new_tokens: int) -> str:
        """``context`` as :func:`litpeft.inference.generate` takes it (text it encodes without special
        tokens): with the special tokens ``HFLM`` puts first written out, cut from the left to leave room
        for ``new_tokens``."""
        room = self.max_length + 1 - new_tokens
        if room <= 0:
            raise LitPeftError(
                f"a task asks for {new_tokens} new tokens, as many as the model's context ({self.max_length + 1})"
            )
        ids = self.tok_encode(context)
        plain = self.tokenizer.encode(context, add_special_tokens=False)
        head = len(ids) - len(plain)
        if len(ids) <= room and head >= 0 and ids[head:] == plain:
            return self.tokenizer.decode(ids[:head]) + context
        log.warning("a context of %d tokens is cut to its last %d", len(ids), room)
        return self.tokenizer.decode(ids[-room:])


# -- tasks ------------------------------------------------------------------------------------------
@functools.cache
def _task_manager(include: tuple[str, ...], defaults: bool) -> TaskManager:
    """lm-eval's task index (building the built-in one reads some 15,000 YAML files: once per process)."""
    return TaskManager(include_path=list(include) or None, include_defaults=defaults)


def _is_file_spec(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or Path(spec).is_file()


def _group_name(path: str) -> str | None:
    """The ``group:`` a YAML file defines (``None`` for a task file)."""
    found = re.search(r"^group\s*:\s*['\"]?([^'\"\s#]+)", Path(path).read_text(errors="replace"), re.M)
    return found.group(1) if found else None


def load_tasks(tasks: str) -> tuple[TaskManager, list[Any]]:
    """The tasks named in ``tasks`` (comma-separated names, globs or task YAML files), built with their
    data: ``(the task manager, the top-level tasks and groups)``.

    A task file is read by itself; a group file's directory joins lm-eval's ``include_path`` (lm-eval
    indexes it with its subdirectories), so that the group finds the tasks it names there. The built-in
    index is read only when a name needs it.
    """
    specs = [s.strip() for s in tasks.split(",") if s.strip()]
    if not specs:
        raise LitPeftError("--tasks is empty; give task names (arc_easy,hellaswag) or task YAML files")
    files = [s for s in specs if _is_file_spec(s)]
    for spec in files:
        if not Path(spec).is_file():
            raise LitPeftError(f"--tasks: task file '{spec}' does not exist")
    groups = {s: _group_name(s) for s in files if _group_name(s)}  # loaded by name, from the index
    include = tuple(sorted({str(Path(s).resolve().parent) for s in groups}))
    manager = _task_manager(include, len(files) < len(specs))
    resolved: list[str] = []
    for spec in specs:
        if spec in files:
            resolved.append(groups.get(spec) or str(Path(spec).resolve()))
            continue
        matched = manager.match_tasks([spec])
        if not matched:
            close = difflib.get_close_matches(spec, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise LitPeftError(
                f"--tasks: unknown lm-eval task '{spec}'{hint}; `lm-eval ls tasks` lists them, "
                "or give a task YAML file"
            )
        resolved.extend(matched)
    try:
        built = manager.load(resolved)
    except ConnectionError as e:  # datasets' "Couldn't reach 'org/name' on the Hub (...)"
        raise LitPeftError(
            f"--tasks: {e}; the task's data is on the Hugging Face hub, which cannot be reached here "
            "(HF_HUB_OFFLINE is set or there is no network): run it once where the hub is reachable (the "
            "datasets cache then serves it) or use a local task YAML"
        ) from None
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise LitPeftError(f"--tasks: lm-eval could not build the tasks: {e}") from None
    children = {name for names in built["group_map"].values() for name in names}
    top = [g for name, g in built["groups"].items() if name not in children]
    return manager, top + [t for name, t in built["tasks"].items() if name not in children]


def result_name(tasks: str) -> str:
    """The default result file's name: ``lm_eval-<task names>.json`` (a YAML file by its stem)."""
    names = [Path(s).stem if _is_file_spec(s) else s for s in (t.strip() for t in tasks.split(",")) if s]
    text = re.sub(r"[^\w.+-]", "_", "+".join(names))
    return f"lm_eval-{text if len(text) <= 80 else f'{len(names)}-tasks'}.json"


def evaluate_tasks(
    tasks: str,
    adapter: str | None,
    model: str | None,
    output: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    dtype: str | None = None,
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_other_base: bool = False,
) -> dict[str, Any]:
    """Run lm-eval's ``tasks`` on base + adapter; print its table; write its results (JSON) to ``output``
    (default: ``<adapter>/lm_eval-<tasks>.json``; none for a bare base without ``output``)."""
    if num_fewshot is not None and num_fewshot < 0:
        raise LitPeftError(f"--num_fewshot must be >= 0, got {num_fewshot}")
    path = Path(output) if output else Path(adapter) / result_name(tasks) if adapter else None
    if path is not None and not output:
        check_writable(path.parent, f"evaluation results '{path}': its directory")
    manager, task_objects = load_tasks(tasks)  # unknown names and unreachable data fail before the model
    loaded = load_for_inference(adapter, model, dtype, device, None, trust_remote_code, allow_other_base)
    results = evaluator.simple_evaluate(
        model=HarnessLM(loaded, batch_size),
        tasks=task_objects,
        task_manager=manager,
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        device=str(loaded.model.device),
        log_samples=False,
    )
    assert results is not None  # one process: rank 0
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if path is not None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
        log.info("lm-eval results written to %s", path)
    return results


__all__ = ["HarnessLM", "evaluate_tasks", "load_tasks", "result_name"]
