"""The engine's loop on its own thread, feeding asyncio streams: how the Serve replica talks to the engine.

One daemon thread runs `engine.step()` while there is work and sleeps on an event otherwise, so the replica's
event loop stays free for HTTP while torch computes (torch releases the GIL in its kernels). Each request gets
an asyncio.Queue of TokenEvents, filled from the engine thread with `call_soon_threadsafe`. Closing a stream
early (a client that went away) aborts the request, which frees its batch slot and KV blocks at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

from .engine import Engine, SamplingParams, TokenEvent

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, engine: Engine, on_step: Callable[[list[TokenEvent], float], None] | None = None):
        self.engine = engine
        self._on_step = on_step  # metrics: the events of a step and its duration
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopped = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="looplm-engine", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopped:
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            started = time.perf_counter()
            try:
                events = self.engine.step()
            except BaseException as err:  # a broken engine: fail every open stream, then stop
                log.exception("engine step failed")
                self._error = err
                for loop, queue in list(self._streams.values()):
                    loop.call_soon_threadsafe(queue.put_nowait, err)
                return
            if self._on_step is not None:
                self._on_step(events, time.perf_counter() - started)
            for event in events:
                target = self._streams.get(event.request_id)
                if target is not None:
                    target[0].call_soon_threadsafe(target[1].put_nowait, event)

    async def stream(self, prompt: Sequence[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Submit a request (raises RequestError / QueueFullError at once) and yield its events."""
        if self._error is not None:
            raise RuntimeError(f"the engine stopped after an error: {self._error}")
        queue: asyncio.Queue = asyncio.Queue()
        request_id = f"req-{uuid.uuid4().hex}"
        # Registered before the engine sees the request: its first token may come before add_request returns.
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        try:
            self.engine.add_request(prompt, params, request_id=request_id)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        self._wake.set()
        return self._events(request_id, queue)

    async def _events(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError(f"the engine failed: {item}") from item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the consumer went away (or was cancelled): free the slot and the blocks
                self.engine.abort(request_id)
                self._wake.set()
