"""MLflow runs for looplm: one run per pipeline execution, a nested run per step, logging that survives an outage.

    with pipeline_run("demo", config=cfg) as run:                 # params = the full resolved config
        with step_run(run, "evaluate", config=eval_cfg) as step:  # nested: tagged with its parent
            step.log_metrics({"val_loss": 2.1}, step=4)
            step.log_figure(fig, "plots/loss_by_step.png")

Log from the driver (or the Ray Train controller), never once per rank: a RunLogger is one run.

Every run is tagged with the code version (the git commit of the looplm checkout and whether it was dirty).
Writes go through `MlflowClient` (no global active run) and are queued: metrics are sent in batches, params,
tags and artifacts as soon as they can be. When the server does not answer, nothing is dropped and the caller
is not blocked: the queue is kept, a warning says the server is down, and the next write or `flush` tries again.
If the server is still down when the run ends, the queue is written to a JSON-lines spill file whose path the
warning names, so a long training run never dies of, or silently loses metrics to, a tracking outage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from looplm.infra.mlflow_server import is_healthy

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "looplm"
PARENT_TAG = "mlflow.parentRunId"  # the tag MLflow's UI nests runs by
MAX_PARAM_CHARS = 6000  # MLflow rejects longer param values; the full config is also logged as config.json
SPILL_DIR_ENV = "LOOPLM_TRACKING_SPILL_DIR"


# ---------------------------------------------------------------- what a run records about itself


def code_version(repo: str | Path | None = None) -> dict[str, str]:
    """The git commit of the looplm checkout and whether its tracked files differ from it."""
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"mlflow.source.git.commit": "unknown", "looplm.git_dirty": "unknown"}
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "mlflow.source.git.commit": commit,
        "looplm.git_commit": commit,
        "looplm.git_dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
    }


def config_as_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"a config must be a dataclass instance or a mapping, got {type(config).__name__}")


def flatten_params(config: Any, prefix: str = "") -> dict[str, str]:
    """A (nested) config as MLflow params: dotted keys, JSON-ish values, cut to MLflow's length limit."""
    flat: dict[str, str] = {}
    for key, value in config_as_dict(config).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        flat[name] = text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."
    return flat


def local_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts beside a sqlite store (<db folder>/artifacts): MLflow's own default is ./mlruns of whatever the
    current directory is. None for a server (it decides: proxied artifacts) and for other stores."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///"))  # sqlite:////abs/x.db -> /abs/x.db
    return (database.resolve().parent / "artifacts").as_uri()


# ---------------------------------------------------------------- one run


class RunLogger:
    """One MLflow run whose writes are queued and retried; see the module docstring.

    The run itself is created lazily, on the first write that reaches the server, so a run started while the
    server is down is created once it is back (with its real start time) or spilled to disk at the end.
    """

    def __init__(
        self,
        tracking_uri: str,
        name: str,
        *,
        experiment: str = DEFAULT_EXPERIMENT,
        parent: RunLogger | None = None,
        tags: Mapping[str, str] | None = None,
        metric_batch: int = 200,
        flush_interval_s: float = 10.0,
    ):
        from mlflow.tracking import MlflowClient  # mlflow imports in ~1.5 s: only when a run is made

        self.tracking_uri = tracking_uri
        self.name = name
        self.experiment = experiment
        self.parent = parent
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id: str | None = None
        self.start_ms = int(time.time() * 1000)
        self._tags: dict[str, str] = {"mlflow.runName": name, **(tags or {})}
        self._params: dict[str, str] = {}
        self._metrics: list[Any] = []  # mlflow.entities.Metric, in logging order
        self._artifacts: list[tuple[str, str | None]] = []  # (local file, artifact folder)
        self._staging = Path(tempfile.mkdtemp(prefix="looplm-run-"))  # figures and tables until uploaded
        self._metric_batch = metric_batch
        self._flush_interval_s = flush_interval_s
        self._last_flush = time.monotonic()
        self._down_since: float | None = None
        self.closed = False

    # ------------------------------------------------------------ what callers log

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._params.update(flatten_params(params))
        self.flush()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._tags.update({key: str(value) for key, value in tags.items()})
        self.flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Queue metrics at `step` (for looplm's evaluation: the recurrent step, the threshold index, ...)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            value = float(value)
            if math.isnan(value):
                log.warning("run %s: metric %s is NaN at step %d", self.name, key, step)
            self._metrics.append(Metric(key=key, value=value, timestamp=now, step=int(step)))
        due = time.monotonic() - self._last_flush >= self._flush_interval_s
        # While the server is down, retry on the interval only, not on every call of a training loop.
        if due or (len(self._metrics) >= self._metric_batch and not self.is_down):
            self.flush()

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        local_path = Path(local_path)
        if not local_path.exists():
            raise FileNotFoundError(f"artifact {local_path} does not exist")
        self._artifacts.append((str(local_path), artifact_path))
        self.flush()

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure as a PNG artifact at `artifact_file` (e.g. "plots/loss_by_step.png")."""
        path = self._staging_path(artifact_file)
        figure.savefig(path, format="png", dpi=110, bbox_inches="tight")
        self.log_artifact(path, str(Path(artifact_file).parent) if "/" in artifact_file else None)

    def log_text(self, text: str, artifact_file: str) -> None:
        path = self._staging_path(artifact_file)
        path.write_text(text)
        self.log_artifact(path, str(Path(artifact_file).parent) if "/" in artifact_file else None)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2, default=str) + "\n", artifact_file)

    def _staging_path(self, artifact_file: str) -> Path:
        # One staging folder per artifact so that two files of the same name in different folders never clash.
        folder = Path(tempfile.mkdtemp(dir=self._staging))
        return folder / Path(artifact_file).name

    # ------------------------------------------------------------ sending

    @property
    def is_down(self) -> bool:
        return self._down_since is not None

    def _reachable(self) -> bool:
        # A dead HTTP server makes MLflow's client retry with backoff for minutes; one /health probe fails fast.
        if self.tracking_uri.startswith(("http://", "https://")):
            return is_healthy(self.tracking_uri, timeout_s=2.0)
        return True

    def _ensure_run(self) -> None:
        if self.run_id is not None:
            return
        tags = dict(self._tags)
        if self.parent is not None:
            self.parent._ensure_run()
            tags[PARENT_TAG] = self.parent.run_id
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = local_artifact_location(self.tracking_uri)
            experiment_id = self.client.create_experiment(self.experiment, artifact_location=location)
        run = self.client.create_run(experiment_id, start_time=self.start_ms, tags=tags, run_name=self.name)
        self.run_id = run.info.run_id
        self._tags = {}

    def flush(self) -> bool:
        """Send everything queued; True when the queue is empty afterwards. Never raises for an outage."""
        self._last_flush = time.monotonic()
        if not (self._params or self._tags or self._metrics or self._artifacts or self.run_id is None):
            return True
        if not self._reachable():
            self._mark_down("does not answer /health")
            return False
        try:
            from mlflow.entities import Param, RunTag

            self._ensure_run()
            params = [Param(k, v) for k, v in self._params.items()]
            tags = [RunTag(k, v) for k, v in self._tags.items()]
            for start in range(0, max(len(params), len(tags)), 100):  # MLflow's per-request limits
                self.client.log_batch(self.run_id, params=params[start : start + 100], tags=tags[start : start + 100])
            self._params, self._tags = {}, {}
            while self._metrics:
                self.client.log_batch(self.run_id, metrics=self._metrics[:1000])
                del self._metrics[:1000]
            while self._artifacts:
                local, folder = self._artifacts[0]
                self.client.log_artifact(self.run_id, local, folder)
                self._artifacts.pop(0)
        except Exception as err:  # noqa: BLE001 (any client or transport error: keep the queue, go on)
            self._mark_down(f"{type(err).__name__}: {err}")
            return False
        if self._down_since is not None:
            log.warning("run %s: tracking server %s is back; queued writes sent", self.name, self.tracking_uri)
            self._down_since = None
        return True

    def _mark_down(self, why: str) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "run %s: cannot reach the tracking server %s (%s); queuing writes and carrying on",
                self.name,
                self.tracking_uri,
                why,
            )

    def close(self, status: str = "FINISHED") -> Path | None:
        """End the run. Returns the spill file's path if the server was still down, else None."""
        if self.closed:
            return None
        self.closed = True
        if self.flush():
            try:
                self.client.set_terminated(self.run_id, status=status, end_time=int(time.time() * 1000))
                shutil.rmtree(self._staging, ignore_errors=True)
                return None
            except Exception as err:  # noqa: BLE001
                self._mark_down(f"{type(err).__name__}: {err}")
        return self._spill(status)

    def _spill(self, status: str) -> Path:
        folder = Path(os.environ.get(SPILL_DIR_ENV) or Path(tempfile.gettempdir()) / "looplm-tracking-spill")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name.replace('/', '_')}-{self.start_ms}-{os.getpid()}.jsonl"
        with path.open("w") as out:
            header = {"run_name": self.name, "run_id": self.run_id, "experiment": self.experiment, "status": status}
            header["parent_run_id"] = self.parent.run_id if self.parent is not None else None
            out.write(json.dumps({"run": header}) + "\n")
            out.write(json.dumps({"params": self._params, "tags": self._tags}) + "\n")
            for m in self._metrics:
                out.write(json.dumps({"metric": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp}))
                out.write("\n")
            for local, folder_name in self._artifacts:
                out.write(json.dumps({"artifact": local, "artifact_path": folder_name}) + "\n")
        log.warning(
            "run %s: tracking server %s unreachable at the end; %d metrics, %d params and %d artifacts kept in %s",
            self.name,
            self.tracking_uri,
            len(self._metrics),
            len(self._params),
            len(self._artifacts),
            path,
        )
        return path


# ---------------------------------------------------------------- runs as context managers


def pyplot():
    """matplotlib.pyplot on the Agg backend: figures are written to files and logged, never shown (servers, tests)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError(
            "no tracking URI: pass one or set MLFLOW_TRACKING_URI (`looplm mlflow` starts a server and prints it)"
        )
    return uri


@contextlib.contextmanager
def pipeline_run(
    name: str,
    *,
    config: Any = None,
    experiment: str = DEFAULT_EXPERIMENT,
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> Iterator[RunLogger]:
    """The run of one pipeline execution: code version tags, the config as params and as config.json."""
    run = RunLogger(
        resolve_tracking_uri(tracking_uri), name, experiment=experiment, tags={**code_version(), **(tags or {})}
    )
    with _running(run, config):
        yield run


@contextlib.contextmanager
def step_run(
    parent: RunLogger, name: str, *, config: Any = None, tags: Mapping[str, str] | None = None
) -> Iterator[RunLogger]:
    """A nested run for one step of `parent`'s pipeline, in the same experiment, named "<pipeline>/<step>" so
    that two pipelines' steps stay apart when the UI charts them side by side (the step alone is a tag)."""
    run = RunLogger(
        parent.tracking_uri,
        f"{parent.name}/{name}",
        experiment=parent.experiment,
        parent=parent,
        tags={**code_version(), "looplm.step": name, **(tags or {})},
    )
    with _running(run, config):
        yield run


@contextlib.contextmanager
def _running(run: RunLogger, config: Any) -> Iterator[RunLogger]:
    if config is not None:
        run.log_params(config)
        run.log_dict(config_as_dict(config), "config.json")
    try:
        yield run
    except BaseException:
        run.close("FAILED")
        raise
    run.close("FINISHED")


def attached_run(tracking_uri: str, run_id: str, name: str, *, experiment: str = DEFAULT_EXPERIMENT) -> RunLogger:
    """A RunLogger for a run that already exists (created by another process, e.g. the pipeline's driver), to
    nest step runs under it from a Ray task. Closing it is the creator's job: use it as a parent only."""
    run = RunLogger(tracking_uri, name, experiment=experiment)
    run.run_id = run_id
    run._tags = {}  # the creator named and tagged the run
    return run
