"""The serving engine: continuous batching of a LoopLM with real early exit and paged KV memory.

    engine = Engine(model, EngineConfig(kv_cache="per_step"), tokenizer=tokenizer)
    request_id = engine.add_request(prompt_ids, SamplingParams(max_tokens=32, exit_threshold=0.5))
    while engine.has_work():
        for event in engine.step(): ...          # one TokenEvent per generated token, per request

Design choices:
- Continuous batching. `step()` is one iteration: it first admits waiting requests (their prefill, within
  the iteration's token budget, the batch size and the free KV blocks), then runs one decode step for every
  running request. Requests join and leave between iterations; there is no closed batch.
- Real early exit. A decode step runs the shared stack pass by pass; after each pass the per-request exit
  rule (Q-exit at the request's threshold, or its static depth) drops the rows that stop, and the next pass
  runs only the rows still looping. Skipped passes are never computed. Prefill runs every step, as in the
  reference (every step needs its own prompt keys). All rows start a token at pass 1 together, so a pass
  holds rows at one depth; letting a row at loop 3 share a pass with another request's loop 1 (which needs
  per-row cache slots within one layer call) is neither built nor measured.
- The reference semantics. Prefill, the exit decision (`select_exit_steps` on the prompt's last position),
  the per-pass decision while decoding, the KV strategies and sampling (`sample_next`, one generator per
  request) are those of `looplm.model.generation.generate`, so a request's tokens equal the reference's for
  that prompt alone.
- Memory. KV lives in preallocated blocks (`paged_kv.PagedKV`). A request reserves the blocks for its prompt
  plus max_tokens when it is admitted, so a running request can never run out: admission control keeps
  waiting requests waiting until their blocks are free, refuses at once a request that could never fit
  (`RequestError`), and refuses new work past the queue limit (`QueueFullError`).
- Text. With a tokenizer the engine decodes incrementally, holds back text that may still become a stop
  string or an incomplete UTF-8 character, and ends a request at a stop string (which is not returned).

`add_request` and `abort` may be called from other threads while one thread runs `step()`: they only touch
an intake list under a lock, which `step()` drains at its start.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from looplm.model import LoopLM, QExit, select_exit_steps
from looplm.model.generation import sample_next

from .paged_kv import STRATEGIES, PagedKV

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class RequestError(ValueError):
    """A request the engine cannot take as it is; `param` names the offending field (OpenAI's error shape)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry later."""


@dataclass(frozen=True)
class EngineConfig:
    kv_cache: str = "per_step"  # shared caches lose quality on some models: a deliberate per-deployment choice
    max_batch_size: int = 32  # running requests
    max_batch_tokens: int = 2048  # tokens per iteration: prefill tokens plus one per decoding request
    max_queue: int = 64  # requests waiting beyond the batch's free slots; past it, QueueFullError
    block_size: int = 16
    kv_cache_tokens: int = 16384  # KV capacity in positions, shared by all requests (rounded up to blocks)
    max_model_len: int | None = None  # prompt + max_tokens; None: the model's context
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    max_loop_steps: int | None = None  # the deepest loop_steps a request may ask for; None: the model's T
    default_exit_threshold: float | None = None  # None: the model config's early_exit_threshold
    min_exit_threshold: float = 0.0  # requests may not ask for an earlier exit than this
    dtype: str = "float32"  # "bfloat16" for the GPU path
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.kv_cache not in STRATEGIES:
            raise ValueError(f"kv_cache must be one of {', '.join(STRATEGIES)}, got {self.kv_cache!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        for name in ("max_batch_size", "max_batch_tokens", "block_size", "kv_cache_tokens", "max_tokens_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if not 0.0 <= self.min_exit_threshold <= 1.0:
            raise ValueError(f"min_exit_threshold must lie in [0, 1], got {self.min_exit_threshold}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # the model's eos_token_id ends generation unless this is set
    loop_steps: int | None = None  # static depth T for this request; None: the server's default
    exit_threshold: float | None = None  # Q-exit threshold q; None: the server's default


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request; the last event of a request has finish_reason set."""

    request_id: str
    token_id: int | None  # None on a final event that carries no token (an abort)
    text: str  # newly released text (with a tokenizer), possibly empty
    exit_step: int
    finish_reason: str | None = None  # "stop", "length" or "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    mean_steps: float = 0.0  # average recurrent steps per generated token so far


@dataclass
class EngineStats:
    waiting: int
    running: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_bytes_per_token: int
    prefill_tokens: int
    generated_tokens: int
    decode_tokens: int  # tokens fed through a decode step (the first generated token comes from prefill)
    decode_layer_calls: int  # (row, layer) invocations in decode steps
    decode_loop_steps: int  # (row, pass) invocations in decode steps
    aborted_requests: int
    iterations: int

    @property
    def layer_calls_per_token(self) -> float:
        return self.decode_layer_calls / max(self.decode_tokens, 1)

    @property
    def loop_steps_per_token(self) -> float:
        return self.decode_loop_steps / max(self.decode_tokens, 1)


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    steps: int  # T for this request
    threshold: float
    stop_ids: frozenset[int]
    generator: torch.Generator
    arrival: float
    blocks: list[int] = field(default_factory=list)
    table: torch.Tensor | None = None
    tokens: list[int] = field(default_factory=list)
    exit_steps: list[int] = field(default_factory=list)
    text: str = ""  # decoded text of `tokens` (without a stop string)
    released: int = 0  # characters of `text` already handed out

    @property
    def length(self) -> int:
        """Positions in the KV cache: the prompt plus every generated token but the newest."""
        return len(self.prompt) + max(len(self.tokens) - 1, 0)


class Engine:
    """Serves one model; it moves and casts `model` in place to the config's device and dtype."""

    def __init__(self, model: LoopLM, config: EngineConfig = EngineConfig(), tokenizer=None):
        self.config = config
        self.device = torch.device(config.device)
        self.model = model.to(device=self.device, dtype=config.torch_dtype).eval()
        self.tokenizer = tokenizer
        mc = model.config
        self.max_steps = config.max_loop_steps or mc.total_ut_steps
        self.default_steps = min(mc.total_ut_steps, self.max_steps)
        self.default_threshold = (
            mc.early_exit_threshold if config.default_exit_threshold is None else config.default_exit_threshold
        )
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        num_blocks = -(-config.kv_cache_tokens // config.block_size)
        self.kv = PagedKV(
            config.kv_cache,
            num_layers=mc.num_hidden_layers,
            max_steps=self.max_steps,
            num_blocks=num_blocks,
            block_size=config.block_size,
            kv_heads=mc.num_key_value_heads,
            head_dim=mc.attention_head_dim,
            dtype=config.torch_dtype,
            device=self.device,
        )
        self._lock = threading.Lock()
        self._intake: deque[_Request] = deque()
        self._aborts: set[str] = set()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._ids = itertools.count()
        self._counters = dict.fromkeys(
            (
                "prefill_tokens",
                "generated_tokens",
                "decode_tokens",
                "decode_layer_calls",
                "decode_loop_steps",
                "aborted_requests",
            ),
            0,
        )
        self._iterations = 0

    # ---------------------------------------------------------------- requests in

    def validate(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise RequestError naming the field if the request can never be served as asked."""
        vocab = self.model.config.vocab_size
        if len(prompt) == 0:
            raise RequestError("the prompt is empty: it needs at least one token", "prompt")
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        if not isinstance(params.max_tokens, int) or params.max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer, got {params.max_tokens!r}", "max_tokens")
        if params.max_tokens > self.config.max_tokens_limit:
            raise RequestError(
                f"max_tokens {params.max_tokens} is over this server's limit of {self.config.max_tokens_limit}",
                "max_tokens",
            )
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt)} tokens and max_tokens is {params.max_tokens}: together more than "
                f"the context of {self.max_model_len} tokens",
                "prompt" if len(prompt) >= self.max_model_len else "max_tokens",
                "context_length_exceeded",
            )
        if self.kv.blocks_for(len(prompt) + params.max_tokens) > self.kv.num_blocks:
            raise RequestError(
                f"prompt plus max_tokens ({len(prompt) + params.max_tokens} tokens) is more than the server's KV "
                f"memory holds ({self.kv.num_blocks * self.kv.block_size} tokens)",
                "max_tokens",
            )
        if params.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {params.temperature}", "temperature")
        if not 0.0 < params.top_p <= 1.0:
            raise RequestError(f"top_p must lie in (0, 1], got {params.top_p}", "top_p")
        if params.top_k is not None and params.top_k < 1:
            raise RequestError(f"top_k must be >= 1, got {params.top_k}", "top_k")
        if params.loop_steps is not None and not 1 <= params.loop_steps <= self.max_steps:
            raise RequestError(
                f"loop_steps must lie in [1, {self.max_steps}] on this server, got {params.loop_steps}", "loop_steps"
            )
        if params.exit_threshold is not None and not self.config.min_exit_threshold <= params.exit_threshold <= 1:
            raise RequestError(
                f"exit_threshold must lie in [{self.config.min_exit_threshold}, 1] on this server, "
                f"got {params.exit_threshold}",
                "exit_threshold",
            )
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise RequestError(f"stop_token_ids must lie in [0, {vocab})", "stop_token_ids")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer, and this engine has none", "stop")

    def add_request(self, prompt: Sequence[int], params: SamplingParams, request_id: str | None = None) -> str:
        self.validate(prompt, params)
        with self._lock:
            free_slots = max(self.config.max_batch_size - len(self._running), 0)
            if len(self._intake) + len(self._waiting) >= self.config.max_queue + free_slots:
                raise QueueFullError(f"{self.config.max_queue} requests are already waiting")
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            stop_ids = set(params.stop_token_ids)
            if not params.ignore_eos:
                stop_ids.add(self.model.config.eos_token_id)
            request = _Request(
                id=request_id or f"req-{next(self._ids)}",
                prompt=list(prompt),
                params=params,
                steps=params.loop_steps or self.default_steps,
                threshold=self.default_threshold if params.exit_threshold is None else params.exit_threshold,
                stop_ids=frozenset(stop_ids),
                generator=torch.Generator(device=self.device).manual_seed(seed),
                arrival=time.monotonic(),
            )
            self._intake.append(request)
        return request.id

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks at the start of the next iteration."""
        with self._lock:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._intake or self._waiting or self._running or self._aborts)

    def stats(self) -> EngineStats:
        return EngineStats(
            waiting=len(self._waiting) + len(self._intake),
            running=len(self._running),
            kv_blocks_total=self.kv.num_blocks,
            kv_blocks_used=self.kv.used_blocks,
            kv_bytes_per_token=self.kv.bytes_per_token(),
            iterations=self._iterations,
            **self._counters,
        )

    # ---------------------------------------------------------------- one iteration

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """Admit what fits, prefill it, and run one decode step for every running request."""
        events: list[TokenEvent] = []
        with self._lock:
            self._waiting.extend(self._intake)
            self._intake.clear()
            aborts, self._aborts = self._aborts, set()
        for request in [r for r in self._running if r.id in aborts]:
            self._finish(request, "abort", events, None)
        for request in [r for r in self._waiting if r.id in aborts]:
            self._waiting.remove(request)
            self._counters["aborted_requests"] += 1
            events.append(TokenEvent(request.id, None, "", 0, "abort", len(request.prompt)))

        decoding = list(self._running)  # requests admitted below get their first token from prefill
        budget = self.config.max_batch_tokens - len(decoding)
        admitted = 0
        while self._waiting and len(self._running) < self.config.max_batch_size:
            request = self._waiting[0]
            need = self.kv.blocks_for(len(request.prompt) + request.params.max_tokens)
            too_big = len(request.prompt) > budget and admitted > 0  # a long prompt goes first in a later step
            if need > self.kv.free_blocks or too_big:
                break  # first come, first served: later requests wait behind the head of the queue
            self._waiting.popleft()
            request.blocks = self.kv.allocate(need)
            request.table = torch.tensor(request.blocks, dtype=torch.long, device=self.device)
            self._running.append(request)
            self._prefill(request, events)
            budget -= len(request.prompt)
            admitted += 1

        if decoding:
            self._decode(decoding, events)
        self._iterations += 1
        return events

    def _prefill(self, request: _Request, events: list[TokenEvent]) -> None:
        ids = torch.tensor([request.prompt], device=self.device)
        out = self.model(ids, request.steps, return_logits=False, return_kv=True)
        self.kv.prefill(request.table, out.kv)
        last = [h[:, -1] for h in out.hidden_states]
        exit_step = int(select_exit_steps(last, out.gate_logits[:, -1], QExit(request.threshold))[0])
        self._counters["prefill_tokens"] += len(request.prompt)
        self._emit(request, self.model.lm_head(last[exit_step - 1]), exit_step, events)

    def _decode(self, requests: list[_Request], events: list[TokenEvent]) -> None:
        """Feed every request's newest token through the loop, pass by pass, dropping rows as they exit."""
        model, kv, count = self.model, self.kv, len(requests)
        layers = model.config.num_hidden_layers
        token_ids = torch.tensor([r.tokens[-1] for r in requests], device=self.device)
        positions = torch.tensor([r.length for r in requests], device=self.device)  # where the new token goes
        blocks_needed = kv.blocks_for(int(positions.max()) + 1)
        # Block tables padded to the longest row's blocks (padding reads block 0, masked out below).
        tables = torch.zeros(count, blocks_needed, dtype=torch.long, device=self.device)
        for row, request in enumerate(requests):
            own = request.table[:blocks_needed]
            tables[row, : own.numel()] = own
        steps_of = [r.steps for r in requests]
        gated = any(r.threshold < 1.0 for r in requests)  # else rows leave only at their last step
        last_steps = torch.tensor(steps_of, device=self.device)
        thresholds = torch.tensor([r.threshold for r in requests], device=self.device)
        where = kv.locate(tables, positions)  # (block, offset) of each row's new position
        key_index = torch.arange(blocks_needed * kv.block_size, device=self.device)
        # May attend: cached positions before the row's own, then (appended by Attention) the token itself.
        itself = torch.ones(count, 1, dtype=torch.bool, device=self.device)
        mask = torch.cat([key_index[None] < positions[:, None], itself], 1)[:, None, None]

        embedding = h = model.model.embed_tokens(token_ids)[:, None]
        cos, sin = model.rope(positions[:, None], h.dtype)
        active = torch.arange(count, device=self.device)
        survival = torch.ones(count, device=self.device)
        final_h = torch.empty(count, h.shape[-1], dtype=h.dtype, device=self.device)
        exit_steps = torch.empty(count, dtype=torch.long, device=self.device)
        for t in range(1, max(steps_of) + 1):
            if t > 1:  # a reinject_embedding model re-injects e at each later pass; Ouro's: h unchanged
                h = model.pass_input(h, embedding)
            step_kv = []
            for layer_index, layer in enumerate(model.model.layers):
                past = kv.gather(t, layer_index, tables)
                h, own = layer(h, cos, sin, mask, past)
                kv.record(t, layer_index, where, own)
                step_kv.append(own)
            h = model.model.norm(h)
            self._counters["decode_layer_calls"] += layers * active.numel()
            self._counters["decode_loop_steps"] += active.numel()
            if not gated and t not in steps_of:
                continue  # nobody can leave after this pass: skip the exit bookkeeping
            last = t == last_steps
            done = last
            if gated:
                survival = survival * (1.0 - torch.sigmoid(model.exit_gate(h)[:, 0].float()))
                cdf = torch.where(last, torch.ones_like(survival), 1.0 - survival)
                done = last | ((thresholds < 1.0) & (cdf >= thresholds))
            if not bool(done.any()):
                continue
            final_h[active[done]] = h[done, 0]
            exit_steps[active[done]] = t
            exited = done & ~last
            if kv.strategy == "per_step" and bool(exited.any()):
                exited_kv = [(k[exited], v[exited]) for k, v in step_kv]
                kv.fill_deeper(t, last_steps[exited], (where[0][exited], where[1][exited]), exited_kv)
            if bool(done.all()):
                break
            stay = ~done
            active, h, survival, embedding = active[stay], h[stay], survival[stay], embedding[stay]
            cos, sin, mask, tables = cos[stay], sin[stay], mask[stay], tables[stay]
            where, last_steps, thresholds = (where[0][stay], where[1][stay]), last_steps[stay], thresholds[stay]
        self._counters["decode_tokens"] += count
        logits = model.lm_head(final_h)
        for row, request in enumerate(requests):
            self._emit(request, logits[row : row + 1], int(exit_steps[row]), events)

    # ---------------------------------------------------------------- tokens out

    def _emit(self, request: _Request, logits: torch.Tensor, exit_step: int, events: list[TokenEvent]) -> None:
        """Sample the next token from the logits [1, vocab] of its exit step; record it, or end the request."""
        params = request.params
        top_k = params.top_k
        top_p = params.top_p if params.top_p < 1.0 else None
        token = int(sample_next(logits, params.temperature, top_k, top_p, request.generator)[0])
        if token in request.stop_ids:
            self._finish(request, "stop", events, None)
            return
        request.tokens.append(token)
        request.exit_steps.append(exit_step)
        self._counters["generated_tokens"] += 1
        stopped = self._update_text(request)
        if stopped:
            self._finish(request, "stop", events, token)
        elif len(request.tokens) >= params.max_tokens:
            self._finish(request, "length", events, token)
        else:
            events.append(self._event(request, token, self._release(request, final=False), exit_step, None))

    def _update_text(self, request: _Request) -> bool:
        """Decode the tokens so far; True when a stop string appeared (the text is cut before it)."""
        if self.tokenizer is None:
            return False
        request.text = self.tokenizer.decode(request.tokens, skip_special_tokens=False)
        found = (request.text.find(s, max(request.released - len(s), 0)) for s in request.params.stop)
        cuts = [i for i in found if i >= 0]
        if cuts:
            request.text = request.text[: min(cuts)]
            return True
        return False

    def _release(self, request: _Request, final: bool) -> str:
        """Text that can be handed out now: all of it at the end, else all but a possible stop-string start
        and an incomplete UTF-8 character (decoded as U+FFFD)."""
        text = request.text
        if not final:
            end = len(text)
            while end > max(request.released, len(text) - 3) and text[end - 1] == "\ufffd":
                end -= 1  # at most 3: the bytes of a UTF-8 character still incomplete
            hold = max((len(s) - 1 for s in request.params.stop), default=0)
            for size in range(min(hold, end - request.released), 0, -1):
                if any(s.startswith(text[end - size : end]) for s in request.params.stop):
                    end -= size
                    break
            text = text[:end]
        new = text[request.released :]
        request.released = max(request.released, len(text))
        return new

    def _event(self, request: _Request, token: int | None, text: str, exit_step: int, reason: str | None) -> TokenEvent:
        n = len(request.exit_steps)
        return TokenEvent(
            request.id,
            token,
            text,
            exit_step,
            reason,
            len(request.prompt),
            n,
            sum(request.exit_steps) / n if n else 0.0,
        )

    def _finish(self, request: _Request, reason: str, events: list[TokenEvent], token: int | None) -> None:
        self._running.remove(request)
        if reason == "abort":
            self._counters["aborted_requests"] += 1
        self.kv.release(request.blocks)
        request.blocks, request.table = [], None
        exit_step = request.exit_steps[-1] if token is not None else 0
        events.append(self._event(request, token, self._release(request, final=True), exit_step, reason))

    # ---------------------------------------------------------------- offline convenience

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]):
        """Serve a list of prompts to completion (all submitted at once) and return a Completion per prompt."""
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
        results = {i: Completion([], [], "", None) for i in ids}
        while self.has_work():
            for event in self.step():
                result = results.get(event.request_id)
                if result is None:
                    continue
                if event.token_id is not None:
                    result.tokens.append(event.token_id)
                    result.exit_steps.append(event.exit_step)
                result.text += event.text
                if event.finish_reason:
                    result.finish_reason = event.finish_reason
        return [results[i] for i in ids]


@dataclass
class Completion:
    tokens: list[int]
    exit_steps: list[int]
    text: str
    finish_reason: str | None
