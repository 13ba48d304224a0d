"""What one Serve replica does behind its routes: load the model, run the engine, answer OpenAI requests.

Kept apart from the Serve decorators (`app.py`) so the request handling reads top to bottom. Metrics use
`ray.serve.metrics`, which tags them with the application, deployment and replica.
"""

from __future__ import annotations

import hmac
import json
import time
from pathlib import Path
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from looplm.infra.registry import resolve_model_dir
from looplm.model import load_pretrained
from looplm.model.tokenizer import CHAT_END, load_tokenizer

from .engine import Engine, QueueFullError, RequestError, TokenEvent
from .engine_loop import EngineLoop
from .openai_api import (
    APIError,
    ChatRequest,
    CompletionRequest,
    chunk_body,
    completion_body,
    new_id,
    parse,
    render_chat,
    sse,
    usage,
)


class _Metrics:
    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter("looplm_requests", "requests by route and HTTP status", tag_keys=("route", "status"))
        self.prompt_tokens = Counter("looplm_prompt_tokens", "prompt tokens admitted")
        self.generated_tokens = Counter("looplm_generated_tokens", "tokens generated")
        self.queue_depth = Gauge("looplm_queue_depth", "requests waiting for admission")
        self.running = Gauge("looplm_running_requests", "requests in the running batch")
        self.kv_blocks = Gauge("looplm_kv_blocks_used", "KV cache blocks in use")
        seconds = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
        self.ttft = Histogram("looplm_time_to_first_token_s", "time to first token", boundaries=seconds)
        self.tpot = Histogram("looplm_time_per_output_token_s", "time per output token after the first", seconds)
        self.steps = Histogram(
            "looplm_loop_steps_per_token", "recurrent steps per generated token", boundaries=[1, 2, 3, 4, 6, 8, 16]
        )


class ModelServer:
    def __init__(self, model: str, name: str, config):
        self.name, self.config = name, config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        folder = resolve_model_dir(model, tracking_uri=config.tracking_uri)
        self.model = load_pretrained(folder, dtype=config.engine.torch_dtype, device=config.engine.device)
        self.tokenizer = load_tokenizer(folder)
        self.chat_template = _chat_template(folder)
        chat_end = self.tokenizer.token_to_id(CHAT_END)
        self.chat_stop_ids = (chat_end,) if chat_end is not None else ()
        self.engine = Engine(self.model, config.engine, tokenizer=self.tokenizer)
        self.metrics = _Metrics()
        self.loop = EngineLoop(self.engine, on_step=self._on_step)
        self.created = int(time.time())

    # ---------------------------------------------------------------- plain routes

    def authorize(self, request: Request) -> None:
        if not self.config.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token, k) for k in self.config.api_keys):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": self.name, "object": "model", "created": self.created, "owned_by": "looplm"}],
        }

    def stats(self) -> dict[str, Any]:
        stats = self.engine.stats()
        return {
            **stats.__dict__,
            "layer_calls_per_token": stats.layer_calls_per_token,
            "loop_steps_per_token": stats.loop_steps_per_token,
            "kv_cache": self.config.engine.kv_cache,
            "max_loop_steps": self.engine.max_steps,
        }

    def _on_step(self, events: list[TokenEvent], seconds: float) -> None:
        stats = self.engine.stats()
        self.metrics.queue_depth.set(stats.waiting)
        self.metrics.running.set(stats.running)
        self.metrics.kv_blocks.set(stats.kv_blocks_used)

    # ---------------------------------------------------------------- completions

    async def complete(self, body: bytes, chat: bool):
        route = "chat" if chat else "completions"
        try:
            response = await self._complete(body, chat)
        except APIError as err:
            self.metrics.requests.inc(tags={"route": route, "status": str(err.status)})
            raise
        self.metrics.requests.inc(tags={"route": route, "status": "200"})
        return response

    async def _complete(self, body: bytes, chat: bool):
        request = parse(body, ChatRequest if chat else CompletionRequest)
        if request.model != self.name:
            raise APIError(
                404,
                f"model '{request.model}' does not exist; this server serves '{self.name}'",
                param="model",
                code="model_not_found",
            )
        if chat:
            prompt_ids = self.tokenizer.encode(render_chat(request.messages, self.chat_template)).ids
            max_tokens = request.max_completion_tokens or request.max_tokens
            extra_stops = self.chat_stop_ids
        else:
            prompt_ids = self._prompt_ids(request.prompt)
            max_tokens, extra_stops = request.max_tokens, ()
        if max_tokens is None:  # the default, capped by the context the prompt leaves
            max_tokens = max(min(self.config.default_max_tokens, self.engine.max_model_len - len(prompt_ids)), 1)
        params = request.sampling(max_tokens, extra_stops)
        started = time.perf_counter()
        try:
            events = await self.loop.stream(prompt_ids, params)
        except RequestError as err:
            raise APIError(400, str(err), param=err.param, code=err.code) from None
        except QueueFullError as err:
            raise APIError(
                429,
                f"the server is overloaded ({err}); retry later",
                code="queue_full",
                headers={"Retry-After": str(self.config.retry_after_s)},
            ) from None
        except RuntimeError as err:
            raise APIError(503, str(err), headers={"Retry-After": str(self.config.retry_after_s)}) from None
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        rid = new_id("chatcmpl" if chat else "cmpl")
        if request.stream:
            return StreamingResponse(
                self._sse(events, rid, chat, request.include_usage, started), media_type="text/event-stream"
            )
        text, steps, last = "", [], None
        first_at = None
        async for event in events:
            first_at = first_at or time.perf_counter()
            text += event.text
            if event.token_id is not None:
                steps.append(event.exit_step)
            last = event
        self._observe(started, first_at, last)
        body = completion_body(
            rid,
            self.name,
            text,
            last.finish_reason,
            steps,
            usage(last.prompt_tokens, last.completion_tokens, last.mean_steps),
            chat,
        )
        return JSONResponse(body)

    async def _sse(self, events, rid: str, chat: bool, include_usage: bool, started: float):
        first, first_at, last = True, None, None
        try:
            async for event in events:
                first_at = first_at or time.perf_counter()
                last = event
                steps = [event.exit_step] if event.token_id is not None else []
                if event.text or steps or event.finish_reason:
                    yield sse(chunk_body(rid, self.name, event.text, event.finish_reason, steps, chat, first))
                    first = False
            if include_usage and last is not None:
                use = usage(last.prompt_tokens, last.completion_tokens, last.mean_steps)
                yield sse(
                    {
                        "id": rid,
                        "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": int(time.time()),
                        "model": self.name,
                        "choices": [],
                        "usage": use,
                    }
                )
            yield sse("[DONE]")
            self._observe(started, first_at, last)
        finally:
            await events.aclose()  # a client that went away: the request is aborted, its blocks freed

    def _observe(self, started: float, first_at: float | None, last: TokenEvent | None) -> None:
        if first_at is None or last is None:
            return
        done = time.perf_counter()
        self.metrics.ttft.observe(first_at - started)
        if last.completion_tokens > 1:
            self.metrics.tpot.observe((done - first_at) / (last.completion_tokens - 1))
        if last.completion_tokens:
            self.metrics.generated_tokens.inc(last.completion_tokens)
            self.metrics.steps.observe(last.mean_steps)

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt).ids
        if prompt and all(isinstance(p, int) for p in prompt):
            return list(prompt)
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return self.tokenizer.encode(prompt[0]).ids
        raise APIError(
            400, "prompt must be a string, one string in a list, or a list of token ids (no batches)", param="prompt"
        )


def _chat_template(folder: Path) -> str | None:
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text()).get("chat_template")
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if isinstance(template, list):  # the HF form with named templates
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None
