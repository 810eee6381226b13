"""Requests into token ids, and a batch of them generated together with the text streamed per step.

Requests for the same model and sampling settings are generated as one left-padded batch, as
``litpeft generate`` batches prompts (every method keeps a left-padded row's answer equal to the row's
answer alone, see :mod:`litpeft.methods.virtual_tokens`); requests for different adapters run one group
after the other, each on its own model. Each request stops at its own ``max_tokens`` or stop string
(a per-row stopping criterion), and its text is streamed as it grows.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from litpeft.inference import LoadedModel, sampling_options
from litpeft.methods.layout import max_positions
from litpeft.serve.protocol import APIError


@dataclass
class Job:
    """One request, ready to generate."""

    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str] | None


def make_job(served: dict[str, LoadedModel], request: dict[str, Any], default_max_tokens: int) -> Job:
    """A request (the dict the front end queued) as token ids, checked against the context length.

    A chat request is formatted in the model's prompt style (the adapter's, as ``litpeft generate``
    does); a completion's prompt is used as plain text (``litpeft generate --raw``).
    """
    loaded = served[request["model"]]
    if "messages" in request:
        try:
            text = loaded.prompt(request["messages"])
        except Exception as e:  # a chat template may refuse a conversation (e.g. a system role)
            raise APIError(
                400, f"the messages cannot be formatted for this model: {e}", param="messages"
            ) from e
    else:
        text = request["prompt"]
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    context = max_positions(loaded.model)
    room = context - len(ids)
    if room <= 0 or (request["max_tokens"] is not None and request["max_tokens"] > room):
        asked = request["max_tokens"] or 1
        raise APIError(
            400,
            f"this model's maximum context length is {context} tokens; the request needs "
            f"{len(ids) + asked} ({len(ids)} in the prompt, {asked} for the completion)",
            code="context_length_exceeded",
            param="messages" if "messages" in request else "prompt",
        )
    max_tokens = request["max_tokens"] or min(default_max_tokens, room)
    return Job(request["model"], ids, max_tokens, request["temperature"], request["top_p"], request["stop"])


# -- the text of one row, as it grows ---------------------------------------------------------------
class Detokenizer:
    """A row's generated tokens -> text deltas that always add up to the decoded whole.

    Text that a later token can still change is held back: a trailing partial UTF-8 character
    (``U+FFFD``), trailing whitespace (tokenizers drop a space before some punctuation), and a tail
    that may grow into a stop string.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, job: Job) -> None:
        self.tokenizer, self.job = tokenizer, job
        self.ids: list[int] = []
        self.sent = ""
        self.finish: str | None = None
        self.generated = 0

    def add(self, token: int) -> dict[str, Any]:
        """Take the next token; return the item to send (``{}``: nothing new yet)."""
        self.generated += 1
        if token == self.tokenizer.eos_token_id:
            self.finish = "stop"
        else:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = stop_index(text, self.job.stop)
        if cut is not None:
            text, self.finish = text[:cut], "stop"
        elif self.finish is None and self.generated >= self.job.max_tokens:
            self.finish = "length"
        if self.finish is None:
            stable = _stable(text, self.job.stop)
            delta = stable[len(self.sent) :] if stable.startswith(self.sent) else ""
            self.sent += delta
            return {"text": delta} if delta else {}
        delta = text[len(self.sent) :]
        self.sent = text
        return {
            "text": delta,
            "full": text,
            "finish_reason": self.finish,
            "prompt_tokens": len(self.job.prompt_ids),
            "completion_tokens": self.generated,
        }


def stop_index(text: str, stop: list[str] | None) -> int | None:
    """Where the first stop string starts in ``text`` (``None``: none occurs)."""
    hits = [i for s in stop or [] if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def _stable(text: str, stop: list[str] | None) -> str:
    for s in stop or []:  # a tail that is the start of a stop string may still become one
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                text = text[:-k]
                break
    return text.rstrip("\ufffd").rstrip()


# -- one group: a left-padded batch on one model ----------------------------------------------------
class _Steps(BaseStreamer):
    """``generate``'s streamer: the tokens of each step, as a queue (the prompt itself is skipped)."""

    def __init__(self) -> None:
        self.queue: queue.Queue[torch.Tensor | None] = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.queue.put(value.reshape(-1).cpu())
        self.prompt_seen = True

    def end(self) -> None:
        self.queue.put(None)


class _RowLimits(StoppingCriteria):
    """Stops each row at its own ``max_tokens`` or stop string (``generate`` stops at the batch's max)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, jobs: list[Job], prompt_length: int) -> None:
        self.tokenizer, self.jobs, self.prompt_length = tokenizer, jobs, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        n = input_ids.shape[1] - self.prompt_length
        done = [n >= job.max_tokens for job in self.jobs]
        for r, job in enumerate(self.jobs):
            if job.stop and not done[r]:
                text = self.tokenizer.decode(input_ids[r, self.prompt_length :], skip_special_tokens=True)
                done[r] = stop_index(text, job.stop) is not None
        return torch.tensor(done, device=input_ids.device)


def _generate_group(loaded: LoadedModel, jobs: list[Job]) -> Iterator[list[dict[str, Any]]]:
    """Generate ``jobs`` (same model and sampling) as one batch; per step, one item per job."""
    model, tokenizer = loaded.model, loaded.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(j.prompt_ids) for j in jobs)
    ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs])
    mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs])
    steps, failure = _Steps(), []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(
                    input_ids=ids.to(model.device),
                    attention_mask=mask.to(model.device),
                    max_new_tokens=max(j.max_tokens for j in jobs),
                    pad_token_id=pad,
                    eos_token_id=tokenizer.eos_token_id,
                    stopping_criteria=StoppingCriteriaList([_RowLimits(tokenizer, jobs, width)]),
                    streamer=steps,
                    **sampling_options(jobs[0].temperature, jobs[0].top_p),
                )
        except BaseException as e:  # noqa: BLE001 (re-raised in the consuming thread)
            failure.append(e)
            steps.end()

    thread = threading.Thread(target=run, name="litpeft-generate", daemon=True)
    thread.start()
    rows = [Detokenizer(tokenizer, j) for j in jobs]
    while (tokens := steps.queue.get()) is not None:
        yield [{} if row.finish else row.add(int(t)) for row, t in zip(rows, tokens.tolist(), strict=True)]
    thread.join()
    if failure:
        raise failure[0]
    # generate stops when every row is done, so a row is only left open by an unexpected stop
    yield [{} if row.finish else row.add(tokenizer.eos_token_id) for row in rows]


def generate_batch(
    served: dict[str, LoadedModel], jobs: list[Job | APIError]
) -> Iterator[list[dict[str, Any]]]:
    """A LitServe batch: errors go out first, then each (model, sampling) group is generated in turn.

    Every yielded list has one item per job, ``{}`` where that job has nothing new.
    """
    yield [{"error": j.body()["error"], "status": j.status} if isinstance(j, APIError) else {} for j in jobs]
    groups: dict[tuple[str, float, float], list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        if isinstance(job, Job):
            groups[(job.model, job.temperature, job.top_p)].append(i)
    for (name, _, _), members in groups.items():
        for items in _generate_group(served[name], [jobs[i] for i in members]):  # type: ignore[misc]
            out: list[dict[str, Any]] = [{} for _ in jobs]
            for i, item in zip(members, items, strict=True):
                out[i] = item
            yield out
