"""looplm.serving: the inference engine (continuous batching, real early exit, paged KV strategies) and the
OpenAI-compatible Ray Serve app with its playground page.

    from looplm.infra.ray_cluster import connect
    from looplm.serving import ServeConfig, deploy, shutdown

    connect()
    base_url = deploy("models:/looplm-demo@demo")      # "http://127.0.0.1:8000/v1"
    ...
    shutdown()

`engine.py` is the engine (usable without Ray), `paged_kv.py` its KV memory, `engine_loop.py` the thread that
runs it under asyncio, `openai_api.py` the wire format, `server.py` a replica's request handling, `app.py` the
Serve deployment with `deploy`/`shutdown`, `playground.py` the page at `/`.
"""

from .app import ServeConfig, build_app, deploy, run_app, run_apps, shutdown, wait_ready
from .engine import Engine, EngineConfig, QueueFullError, RequestError, SamplingParams

__all__ = [
    "Engine",
    "EngineConfig",
    "QueueFullError",
    "RequestError",
    "SamplingParams",
    "ServeConfig",
    "build_app",
    "deploy",
    "run_app",
    "run_apps",
    "shutdown",
    "wait_ready",
]
