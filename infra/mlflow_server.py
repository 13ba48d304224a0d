"""The MLflow tracking server as a component: start it on 127.0.0.1, wait until it answers, stop it by process group.

    with MlflowServer(MlflowServerConfig(root="runs/mlflow")) as server:
        os.environ["MLFLOW_TRACKING_URI"] = server.url

Defaults (ray-mlflow-notes.md §6): a sqlite backend store and a local artifact store under `root`, artifacts
proxied by the server (`mlflow-artifacts:/` URIs, so a client on another node needs no shared filesystem),
one uvicorn worker, and the server's background job consumers off (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false:
with them on, seven huey consumers poll at ~17 % of a core while idle). Any backend URI MLflow accepts
(postgresql://..., mysql://...) goes in `backend_store_uri`.

`ensure_tracking_server` reuses a server that MLFLOW_TRACKING_URI already points at and starts one otherwise.
The server runs in its own process group so that `stop` ends it and its workers, and nothing else.

Every command that tracks calls `check_tracking_server` before its work starts: an http(s) tracking URI that
does not answer is refused at once (a typo or a stopped server is found in seconds, not at the end of a long
run; an outage *during* a run is survived by spilling, tracking.py), and runs spilled during an earlier outage of
that server are sent to it (spill.py), with a line per run saying so.

`looplm mlflow` serves on a fixed port (DEFAULT_PORT, or --port), so that after a restart it is where running
jobs and spilled runs expect it; a taken port is a one-line error that says whether an MLflow server holds it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = "runs/mlflow"
DEFAULT_PORT = 5000  # MLflow's own default port: `looplm mlflow` always comes back on it


class MlflowServerError(RuntimeError):
    """The server did not start, or died; the message carries the tail of its log."""


@dataclass(frozen=True)
class MlflowServerConfig:
    root: str = DEFAULT_ROOT  # holds mlflow.db, artifacts/ and server.log unless the URIs below say otherwise
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    backend_store_uri: str | None = None  # None: sqlite:///<root>/mlflow.db
    artifacts_destination: str | None = None  # None: <root>/artifacts
    workers: int = 1
    enable_job_execution: bool = False  # the GenAI-evaluation job consumers (ray-mlflow-notes.md §6)
    startup_timeout_s: float = 120.0  # the first start creates the sqlite tables: ~12 s on 2 busy cores

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"MlflowServerConfig.port must be in [0, 65535], got {self.port}")
        if self.workers < 1:
            raise ValueError(f"MlflowServerConfig.workers must be at least 1, got {self.workers}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def is_healthy(url: str, timeout_s: float = 2.0) -> bool:
    """True when an MLflow server at `url` answers GET /health with 200."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class MlflowServer:
    """One `mlflow server` subprocess. `start` returns once /health answers; `stop` ends its process group."""

    def __init__(self, config: MlflowServerConfig = MlflowServerConfig()):
        self.config = config
        self.root = Path(config.root).resolve()
        self.port = config.port or free_port(config.host)
        self.url = f"http://{config.host}:{self.port}"
        self.log_path = self.root / "server.log"
        self.process: subprocess.Popen | None = None

    @property
    def backend_store_uri(self) -> str:
        return self.config.backend_store_uri or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifacts_destination(self) -> str:
        return self.config.artifacts_destination or str(self.root / "artifacts")

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--host", self.config.host,
            "--port", str(self.port),
            "--workers", str(self.config.workers),
            "--backend-store-uri", self.backend_store_uri,
            "--artifacts-destination", self.artifacts_destination,
        ]  # fmt: skip

    def start(self) -> MlflowServer:
        if self.process is not None:
            raise MlflowServerError(f"the MLflow server at {self.url} is already started")
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": str(self.config.enable_job_execution).lower()}
        env.pop("MLFLOW_TRACKING_URI", None)  # the server must not try to talk to another server
        with open(self.log_path, "ab") as log:
            # A new session makes the server the leader of its own process group: stop() signals that group,
            # which holds its uvicorn worker(s) and nothing of ours.
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + self.config.startup_timeout_s
        while not is_healthy(self.url, timeout_s=1.0):
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise MlflowServerError(f"mlflow server exited with code {code} before answering:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise MlflowServerError(
                    f"mlflow server at {self.url} did not answer /health within "
                    f"{self.config.startup_timeout_s:.0f} s:\n{self._log_tail()}"
                )
            time.sleep(0.25)
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after timeout_s."""
        if self.process is None:
            return
        process, self.process = self.process, None
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # Workers may outlive the leader for a moment; the group is ours alone, so make sure it is gone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def check_tracking_server(uri: str | None = None) -> str | None:
    """The check every command that tracks makes before it starts work: the tracking URI (`uri`, else
    MLFLOW_TRACKING_URI; None when neither is set), refused with MlflowServerError when it is http(s) and does
    not answer /health. Runs spilled during an earlier outage of that server are then sent to it, and printed."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    if uri.startswith(("http://", "https://")) and not is_healthy(uri):
        raise MlflowServerError(
            f"the tracking server MLFLOW_TRACKING_URI={uri} does not answer; start it (`looplm mlflow`) or unset "
            "MLFLOW_TRACKING_URI"
        )
    replay_spilled_runs(uri)
    return uri


def replay_spilled_runs(uri: str) -> list:
    """Send the runs spilled for `uri` to it (spill.py) and print what was sent and what still waits."""
    from looplm.infra.spill import replay_spills, report

    replayed = replay_spills(uri)
    message = report(replayed, uri)
    if message:
        print(message, file=sys.stderr, flush=True)
    return replayed


def ensure_tracking_server(config: MlflowServerConfig = MlflowServerConfig()) -> tuple[str, MlflowServer | None]:
    """The tracking URI to log to, and the server started for it (None when an existing one is reused).

    A MLFLOW_TRACKING_URI that is not http(s) (a sqlite or file store) is used as it is; an http(s) one must
    answer /health, else this is an error rather than a silent second server (`check_tracking_server`).
    """
    uri = check_tracking_server()
    if uri:
        return uri, None
    server = MlflowServer(config).start()
    return server.url, server


def port_is_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _user_error(message: str, args: argparse.Namespace) -> int:
    """A user error of `looplm mlflow`: one line on stderr, exit code 2 (a traceback with --debug)."""
    if getattr(args, "debug", False):
        raise MlflowServerError(message)
    print(f"looplm mlflow: {message}", file=sys.stderr)
    return 2


def run_from_args(args: argparse.Namespace) -> int:
    """`looplm mlflow [--output ROOT] [--port N]`: run a tracking server in the foreground until Ctrl-C or SIGTERM."""
    port = DEFAULT_PORT if getattr(args, "port", None) is None else args.port
    try:
        config = MlflowServerConfig(root=args.output or DEFAULT_ROOT, port=port)
    except ValueError as err:
        return _user_error(str(err), args)
    if port and port_is_taken(config.host, port):
        url = f"http://{config.host}:{port}"
        if is_healthy(url):
            message = f"an MLflow server already answers at {url}: use it (export MLFLOW_TRACKING_URI={url})"
            return _user_error(message + ", or start another one with --port N", args)
        message = f"port {port} on {config.host} is taken by another program; choose a free one with --port N"
        return _user_error(message + " (--port 0: any free port)", args)
    server = MlflowServer(config)
    try:
        server.root.mkdir(parents=True, exist_ok=True)
        if not os.access(server.root, os.W_OK):
            raise PermissionError(f"{server.root} is not writable")
    except OSError as err:
        return _user_error(f"--output {args.output or DEFAULT_ROOT}: cannot hold the server's store ({err})", args)
    print(f"starting mlflow server on {server.url} (store {server.backend_store_uri})", flush=True)
    try:
        server.start()
    except MlflowServerError as err:
        if getattr(args, "debug", False):
            raise
        print(f"looplm mlflow: {str(err).splitlines()[0]}\n  its log: {server.log_path}", file=sys.stderr)
        return 1
    print(f"MLflow UI at {server.url}\n  export MLFLOW_TRACKING_URI={server.url}\n(Ctrl-C stops it)", flush=True)
    replay_spilled_runs(server.url)
    stopping = False

    def _stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stopping and server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    died = server.process is not None and server.process.poll() is not None
    server.stop()
    if died:
        print(f"mlflow server exited on its own; see {server.log_path}", file=sys.stderr)
        return 1
    return 0
