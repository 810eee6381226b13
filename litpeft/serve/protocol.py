"""The OpenAI wire format: request schemas, their validation, errors, and the response bodies.

Only what ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models`` need, written from the
public API reference (https://platform.openai.com/docs/api-reference). Unknown request fields are
accepted and ignored, as OpenAI-compatible servers do; fields litpeft cannot honour (``n > 1``,
``logprobs``, ``tools``) are a 400 rather than a silent wrong answer.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    """An error the client caused (4xx) or the server hit (5xx), as OpenAI sends it."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
        param: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``: what the ``openai`` client parses."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_body(cls, status: int, body: dict[str, Any]) -> APIError:
        e = body["error"]
        return cls(status, e["message"], e["type"], e.get("code"), e.get("param"))


class _Request(BaseModel):
    """What both completion endpoints share (sampling and length)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    logprobs: Any = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops or None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """The content as one string; a list of parts may only hold text parts."""
        if isinstance(self.content, str):
            return self.content
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in self.content):
            raise ValueError("only text content parts are supported")
        return "".join(p["text"] for p in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: Any = None

    def conversation(self) -> list[dict[str, str]]:
        """``[{"role", "content"}]`` in litpeft's form (``developer`` is OpenAI's newer ``system``)."""
        if self.messages[-1].role == "assistant":
            raise APIError(400, "the last message must not be the assistant's", param="messages")
        try:
            return [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages
            ]
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    def text(self) -> str:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            raise APIError(400, "give one prompt per request", param="prompt")
        return prompts[0]


def parse_request(raw: bytes, kind: type[_Request], models: list[str]) -> _Request:
    """The request body parsed and checked; an :class:`APIError` (400 or 404) says what is wrong."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        request = kind.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        raise APIError(400, message, code="invalid_value", param=param) from None
    if request.model not in models:
        raise APIError(
            404,
            f"the model '{request.model}' does not exist; this server has: {', '.join(models)}",
            code="model_not_found",
            param="model",
        )
    if request.logprobs or (isinstance(request, ChatRequest) and request.tools):
        raise APIError(400, "logprobs and tools are not supported", code="unsupported_parameter")
    if isinstance(request, CompletionRequest) and (request.echo or request.suffix):
        raise APIError(400, "echo and suffix are not supported", code="unsupported_parameter")
    return request


# -- responses --------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    chat: bool, rid: str, model: str, text: str, finish: str | None, use: dict[str, int] | None
) -> dict[str, Any]:
    """A whole ``chat.completion`` / ``text_completion`` object."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "logprobs": None}
    obj = "chat.completion" if chat else "text_completion"
    return _envelope(obj, rid, model, [{**choice, "finish_reason": finish}], usage=use)


def chunk_body(
    chat: bool, rid: str, model: str, text: str | None, finish: str | None, first: bool = False
) -> dict[str, Any]:
    """One streamed chunk; for chat the first one also carries the assistant role."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None}
    obj = "chat.completion.chunk" if chat else "text_completion"
    return _envelope(obj, rid, model, [{**choice, "finish_reason": finish}])


def usage_chunk(chat: bool, rid: str, model: str, use: dict[str, int]) -> dict[str, Any]:
    """The last chunk with ``stream_options.include_usage``: no choices, only the usage."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    return _envelope(obj, rid, model, [], usage=use)


def _envelope(obj: str, rid: str, model: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The fields every completion object and chunk shares."""
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        **extra,
    }


def models_body(names: list[str], base: str) -> dict[str, Any]:
    """``/v1/models``: the bare base and each adapter (whose ``parent`` is the base, as vLLM lists LoRAs)."""
    created = int(time.time())
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "litpeft",
                "root": base,
                "parent": None if name == base else base,
            }
            for name in names
        ],
    }
