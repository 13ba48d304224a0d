"""The Ray Serve application: an OpenAI-compatible server over the looplm engine, and the playground page.

    url = deploy("models:/looplm-demo@demo")        # Ray already connected; returns "http://127.0.0.1:8000/v1"
    OpenAI(base_url=url, api_key="-").completions.create(model="looplm", prompt="...")
    shutdown()

Routes: POST /v1/completions and /v1/chat/completions (JSON or server-sent events), GET /v1/models,
GET /v1/engine/stats (the engine's counters), GET /health (liveness) and /health/ready (readiness), and the
playground page at /. With API keys configured, every route except the health routes and the static page
needs `Authorization: Bearer KEY` (the page itself asks for the key and sends it on its calls).

Design choices:
- One replica holds one engine (model weights, KV pool) and runs it on its own thread (`engine_loop`); the
  FastAPI handlers only parse, submit and stream. Serve's own request limit is set high so that this app's
  queue limit decides overload: past it a request gets 429 with Retry-After, never an unbounded wait.
- A client that disconnects mid-stream cancels its handler; the stream's cleanup aborts the request, which
  frees its batch slot and KV blocks at the next engine step.
- The model comes from a checkpoint folder in the Ouro HF layout (tokenizer.json inside) or an MLflow model URI
  (`models:/NAME/VERSION`, `models:/NAME@ALIAS`), resolved inside the replica with `looplm.infra.registry`.
- Metrics are `ray.serve.metrics` (exported on Ray's metrics endpoint): requests by route and status,
  prompt and generated tokens, queue depth, KV blocks in use, time to first token, time per output token,
  and recurrent steps per generated token.
- HTTP binds 127.0.0.1 unless a host is given. (Serve's replica-to-replica gRPC listens on all interfaces and
  cannot be configured: reference/ray-mlflow-notes.md §5.)
"""

import dataclasses
import json
import logging
import os
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from .engine import EngineConfig
from .openai_api import APIError
from .playground import PLAYGROUND_HTML

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    api_keys: tuple[str, ...] = ()  # bearer tokens; empty: no authentication
    default_max_tokens: int = 128  # when a request gives none (capped by the context left)
    num_cpus: float = 1.0  # CPUs the replica reserves
    num_threads: int | None = None  # torch threads in the replica; None: torch's default
    retry_after_s: int = 1  # the Retry-After of a 429
    ready_timeout_s: float = 300.0
    tracking_uri: str | None = None  # MLflow server for models:/ URIs; None: $MLFLOW_TRACKING_URI

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ServeConfig":
        """From YAML/JSON-like data (the Serve config file's args); unknown keys are errors naming them."""
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown serving config key(s): {', '.join(sorted(unknown))}; known: {sorted(known)}")
        engine = data.pop("engine", None) or {}
        engine_known = {f.name for f in dataclasses.fields(EngineConfig)}
        if set(engine) - engine_known:
            raise ValueError(f"unknown engine config key(s): {', '.join(sorted(set(engine) - engine_known))}")
        if "api_keys" in data:
            data["api_keys"] = tuple(data["api_keys"] or ())
        return cls(engine=EngineConfig(**engine), **data)


api = FastAPI(title="looplm", docs_url=None, redoc_url=None)


@api.exception_handler(APIError)
async def _api_error(request: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _deployment_class():
    from ray import serve

    @serve.deployment(max_ongoing_requests=1000, health_check_period_s=5)
    @serve.ingress(api)
    class LoopLMServer:
        def __init__(self, model: str, name: str, config: ServeConfig):
            from .server import ModelServer

            self.server = ModelServer(model, name, config)

        def check_health(self) -> None:
            if not self.server.loop.healthy:
                raise RuntimeError("the engine thread stopped")

        @api.get("/health")
        async def health(self):
            if not self.server.loop.healthy:
                raise APIError(503, "the engine thread stopped")
            return {"status": "ok"}

        @api.get("/health/ready")
        async def ready(self):
            return await self.health()

        @api.get("/", response_class=HTMLResponse)
        async def playground(self):
            return HTMLResponse(PLAYGROUND_HTML)

        @api.get("/v1/models")
        async def models(self, request: Request):
            self.server.authorize(request)
            return self.server.models()

        @api.get("/v1/engine/stats")
        async def stats(self, request: Request):
            self.server.authorize(request)
            return self.server.stats()

        @api.post("/v1/completions")
        async def completions(self, request: Request):
            self.server.authorize(request)
            return await self.server.complete(await request.body(), chat=False)

        @api.post("/v1/chat/completions")
        async def chat_completions(self, request: Request):
            self.server.authorize(request)
            return await self.server.complete(await request.body(), chat=True)

    return LoopLMServer


def build_app(model: str, *, name: str = "looplm", config: ServeConfig | None = None):
    """The Serve application (not yet running) for a checkpoint folder or models:/ URI."""
    config = config or ServeConfig()
    if config.tracking_uri is None and os.environ.get("MLFLOW_TRACKING_URI"):
        config = dataclasses.replace(config, tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    if not str(model).startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        model = str(Path(model).resolve())
        if not (Path(model) / "config.json").is_file():
            raise FileNotFoundError(f"{model} is not a checkpoint folder (no config.json)")
    deployment = _deployment_class().options(name=f"{name}-server", ray_actor_options={"num_cpus": config.num_cpus})
    return deployment.bind(model, name, config)


def build(args: dict[str, Any]):
    """Application builder for a Serve config file: `import_path: looplm.serving.app:build` with args
    {model, name, and any ServeConfig field, `engine` as a mapping}."""
    args = dict(args)
    if "model" not in args:
        raise ValueError("the serving app needs args.model: a checkpoint folder or a models:/ URI")
    model, name = args.pop("model"), args.pop("name", "looplm")
    return build_app(model, name=name, config=ServeConfig.from_dict(args))


def run_app(model: str, *, name: str = "looplm", route_prefix: str = "/", config: ServeConfig | None = None) -> str:
    """Run the app on an already started Serve and wait until it answers; returns its root URL (no /v1)."""
    return run_apps([(model, name, route_prefix, config or ServeConfig())])[0]


def run_apps(apps: list[tuple[str, str, str, ServeConfig]], *, wait: bool = True) -> list[str]:
    """Run several apps (model, name, route_prefix, config) side by side on a started Serve: their replicas
    start together. Returns each app's root URL, once it answers unless wait=False (then `wait_ready`)."""
    from ray import serve
    from ray.serve.api import RunTarget

    targets = [
        RunTarget(build_app(model, name=name, config=config), name=name, route_prefix=prefix)
        for model, name, prefix, config in apps
    ]
    serve.run_many(targets, blocking=False, wait_for_applications_running=wait)
    http = serve.context._get_global_client().http_config
    roots = [f"http://{http.host}:{http.port}{prefix.rstrip('/')}" for _, _, prefix, _ in apps]
    if wait:
        for root, (*_, config) in zip(roots, apps, strict=True):
            wait_ready(root, config.ready_timeout_s)
    return roots


def deploy(
    model: str,
    *,
    name: str = "looplm",
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServeConfig | None = None,
) -> str:
    """Start Serve on host:port (Ray must be connected: `looplm.infra.ray_cluster.connect`), run the app for
    `model` (checkpoint folder or models:/ URI), wait until it is ready, and return the OpenAI base URL."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    return run_app(model, name=name, route_prefix="/", config=config) + "/v1"


def shutdown() -> None:
    """Tear down every Serve application and Serve itself (Ray stays connected)."""
    from ray import serve

    serve.shutdown()


def wait_ready(root: str, timeout_s: float = 300.0) -> None:
    """Block until the app at `root` answers its readiness route."""
    url = root + "/health/ready"
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as err:
            last = err
        time.sleep(0.25)
    raise TimeoutError(f"the serving app at {url} was not ready after {timeout_s:.0f} s (last error: {last})")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_from_args(args) -> int:
    """`looplm serve MODEL`: deploy on the current Ray cluster ($RAY_ADDRESS) or a local one, then serve."""
    from looplm.infra.ray_cluster import connect, disconnect

    engine = EngineConfig(kv_cache=args.kv_cache, max_batch_size=args.max_batch_size)
    keys = tuple(args.api_key or ()) + tuple(k for k in os.environ.get("LOOPLM_API_KEYS", "").split(",") if k)
    config = ServeConfig(engine=engine, api_keys=keys)
    info = connect()
    url = deploy(args.model, name=args.name, host=args.host, port=args.port, config=config)
    print(json.dumps({"base_url": url, "model": args.name, "kv_cache": args.kv_cache}), flush=True)
    if args.keep:
        if info.started_local:
            print("--keep has no effect on a local Ray started by this command: serving until Ctrl-C", flush=True)
        else:
            return 0  # the app keeps running on the cluster; `serve shutdown` removes it
    # SIGTERM (a service manager, `kill`) shuts down as cleanly as Ctrl-C; set here, at the command's entry.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()
        disconnect()
    return 0
