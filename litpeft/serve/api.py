"""The LitServe pieces: the API (the inference worker's side) and the OpenAI spec (the HTTP side).

LitServe runs :class:`PeftAPI` in an inference worker process: ``setup`` loads the base and the
adapters once, ``decode_request`` turns each queued request into token ids (or a 4xx), and ``predict``
generates a batch of them (LitServe's ``max_batch_size``/``batch_timeout`` collect it), yielding one
item per request at every step. :class:`OpenAIEndpoints` is a LitSpec: it registers the three OpenAI
routes on LitServe's FastAPI app, checks each request before it is queued (malformed JSON, bad values,
an unknown model: 4xx at once) and turns the worker's items into a response or an SSE stream.
LitServe's own ``OpenAISpec`` covers chat only, answers errors in FastAPI's ``{"detail"}`` form and
always reports ``finish_reason: stop``, hence this spec.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

import litserve as ls
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from litserve.loops.streaming_loops import BatchedStreamingLoop
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from litpeft.serve.engine import Job, generate_batch, make_job
from litpeft.serve.models import ServeSpec, load_served
from litpeft.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    chunk_body,
    completion_body,
    models_body,
    new_id,
    parse_request,
    usage,
    usage_chunk,
)


class PeftAPI(ls.LitAPI):
    """Base + adapters in one inference worker; batches of requests generated together."""

    def __init__(
        self, spec: ServeSpec, endpoints: OpenAIEndpoints, max_tokens: int, max_batch_size: int,
        batch_timeout: float,
    ) -> None:  # fmt: skip
        # One loop for every batch size: predict always gets a list and yields lists.
        super().__init__(
            max_batch_size=max_batch_size,
            batch_timeout=batch_timeout,
            spec=endpoints,
            loop=BatchedStreamingLoop(),
        )
        self.serve_spec, self.max_tokens = spec, max_tokens

    def setup(self, device: str) -> None:
        self.served = load_served(self.serve_spec, device)

    def decode_request(self, request: dict[str, Any]) -> Job | APIError:
        try:
            return make_job(self.served, request, self.max_tokens)
        except APIError as e:  # answered on its own; the rest of the batch goes on
            return e

    def batch(self, inputs: list[Job | APIError]) -> list[Job | APIError]:
        return list(inputs)

    def predict(self, jobs: list[Job | APIError]) -> Iterator[list[dict[str, Any]]]:
        yield from generate_batch(self.served, jobs)

    def unbatch(self, output: Iterator[list[dict[str, Any]]]) -> Iterator[list[dict[str, Any]]]:
        return output

    def encode_response(self, output: Iterator[list[dict[str, Any]]]) -> Iterator[list[dict[str, Any]]]:
        yield from output


class OpenAIEndpoints(LitSpec):
    """``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models`` on LitServe's app."""

    def __init__(self, names: list[str], base_name: str, api_key: str | None = None) -> None:
        super().__init__()
        self.api_path = "/v1/chat/completions"  # LitServe keys the request queue on it
        self.names, self.base_name, self.api_key = names, base_name, api_key
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/models", self.models, ["GET"])

    @property
    def stream(self) -> bool:
        return True

    def decode_request(self, request: Any, context_kwargs: dict | None = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: dict | None = None) -> Any:
        return output

    # -- routes ------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return JSONResponse(models_body(self.names, self.base_name))

    # -- one completion ------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given, self.api_key):
            raise APIError(401, "invalid API key", type="authentication_error", code="invalid_api_key")

    async def _complete(self, http: Request, chat: bool) -> Response:
        uid = uuid.uuid4()
        try:
            self._authorize(http)
            kind = ChatRequest if chat else CompletionRequest
            request = parse_request(await http.body(), kind, self.names)
            payload = self._payload(request)
            q: deque = deque()
            event = asyncio.Event()
            self.response_buffer[uid] = ResponseBufferItem(response_queue=q, event=event)
            self.request_queue.put((self.response_queue_id, uid, time.monotonic(), payload))
            items = self._items(uid, q, event)
            first = await anext(items)  # the worker's checks (context length) answer before any text
        except APIError as e:
            self.response_buffer.pop(uid, None)
            return JSONResponse(e.body(), status_code=e.status)
        rid = new_id("chatcmpl" if chat else "cmpl")
        if request.stream:
            stream = self._sse(chat, rid, request.model, request.include_usage, first, items)
            return StreamingResponse(stream, media_type="text/event-stream")
        last = first
        try:
            async for item in items:
                last = item
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        use = usage(last["prompt_tokens"], last["completion_tokens"])
        return JSONResponse(
            completion_body(chat, rid, request.model, last["full"], last["finish_reason"], use)
        )

    @staticmethod
    def _payload(request: ChatRequest | CompletionRequest) -> dict[str, Any]:
        """What the worker needs, as plain data (it crosses a process boundary)."""
        out: dict[str, Any] = {
            "model": request.model,
            "max_tokens": getattr(request, "max_completion_tokens", None) or request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stop": request.stop,
        }
        if isinstance(request, ChatRequest):
            out["messages"] = request.conversation()
        else:
            out["prompt"] = request.text()
        return out

    async def _items(self, uid: uuid.UUID, q: deque, event: asyncio.Event) -> AsyncIterator[dict[str, Any]]:
        """The worker's non-empty items for ``uid``, up to the one that finishes it."""
        try:
            async for data, status in self.data_streamer(q, event, send_status=True):
                if status == LitAPIStatus.ERROR:
                    raise APIError(500, f"the inference worker failed: {data}", type="server_error")
                item = json.loads(data)
                if "error" in item:
                    raise APIError.from_body(item["status"], item)
                if item:
                    yield item
                if item.get("finish_reason"):
                    return
            raise APIError(
                500, "the inference worker ended the request without an answer", type="server_error"
            )
        finally:
            self.response_buffer.pop(uid, None)

    @staticmethod
    async def _sse(
        chat: bool, rid: str, model: str, include_usage: bool, first: dict[str, Any],
        items: AsyncIterator[dict[str, Any]],
    ) -> AsyncIterator[str]:  # fmt: skip
        """Server-sent events: a chunk per item, then ``[DONE]`` (an error becomes an ``error`` event)."""

        def event(body: dict[str, Any]) -> str:
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        if chat:
            yield event(chunk_body(chat, rid, model, "", None, first=True))
        item = first
        try:
            while True:
                if item.get("text"):
                    yield event(chunk_body(chat, rid, model, item["text"], None))
                if item.get("finish_reason"):
                    yield event(chunk_body(chat, rid, model, None if chat else "", item["finish_reason"]))
                    if include_usage:
                        use = usage(item["prompt_tokens"], item["completion_tokens"])
                        yield event(usage_chunk(chat, rid, model, use))
                    break
                item = await anext(items)
        except APIError as e:
            yield event(e.body())
        finally:
            await items.aclose()  # type: ignore[attr-defined]
        yield "data: [DONE]\n\n"
