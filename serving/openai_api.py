"""The OpenAI wire format: request schemas, the error shape, the chat template, response and SSE chunk bodies.

Requests are parsed in two stages so each failure names itself: the body must be JSON (else "malformed
JSON"), then it is validated strictly (a string where a number belongs is an error naming the field, never a
silent coercion). Unknown fields are ignored, as OpenAI's own server does with fields newer than it knows.
looplm's extensions ride along as extra fields: `top_k`, `stop_token_ids`, `ignore_eos`, `loop_steps`
(static depth) and `exit_threshold` (Q-exit) in requests; `exit_steps` per choice and
`average_recurrent_steps` in `usage` in responses.

The chat template is the tokenizer config's `chat_template` (Jinja, rendered in a sandbox as transformers
does) when the checkpoint has one, else ChatML, Ouro's format.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .engine import SamplingParams

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class APIError(Exception):
    """An error to answer in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = extra.get("type") or _ERROR_TYPES.get(status, "invalid_request_error")
        self.headers: dict[str, str] = extra.get("headers") or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_ERROR_TYPES = {
    401: "authentication_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # looplm's extensions
    top_k: int | None = Field(default=None, ge=1)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    loop_steps: int | None = Field(default=None, ge=1)
    exit_threshold: float | None = Field(default=None, ge=0.0, le=1.0)

    def sampling(self, max_tokens: int, extra_stop_ids: tuple[int, ...] = ()) -> SamplingParams:
        if self.n != 1:
            raise APIError(400, f"n={self.n} is not supported: this server returns one choice per request", param="n")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()) + extra_stop_ids,
            ignore_eos=self.ignore_eos,
            loop_steps=self.loop_steps,
            exit_threshold=self.exit_threshold,
        )

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False


def parse(body: bytes, schema: type[_Request]) -> _Request:
    """JSON bytes -> a validated request, or an APIError naming what is wrong and where."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"malformed JSON in the request body: {err}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        request = schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise APIError(400, f"invalid value for '{where}': {first['msg']}", param=where) from None
    unsupported = {
        "echo": getattr(request, "echo", False),
        "logprobs": getattr(request, "logprobs", None) not in (None, False),
        "suffix": getattr(request, "suffix", None) is not None,
    }
    for name, asked in unsupported.items():
        if asked:
            raise APIError(400, f"'{name}' is not supported by this server", param=name)
    return request


def render_chat(messages: list[ChatMessage], template: str | None) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    compiled = env.from_string(template or CHATML_TEMPLATE)
    return compiled.render(
        messages=[{"role": m.role, "content": m.text()} for m in messages], add_generation_prompt=True
    )


# ---------------------------------------------------------------- response bodies


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, mean_steps: float) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "average_recurrent_steps": round(mean_steps, 4),
    }


def completion_body(rid, model, text, reason, exit_steps, use, chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None, "exit_steps": exit_steps}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": use,
    }


def chunk_body(rid, model, text, reason, exit_steps, chat: bool, first: bool = False) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None, "exit_steps": exit_steps}
    if chat:
        choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
    else:
        choice["text"] = text
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
