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
If the server is still down when the run ends, the queue is written to a spill folder whose path the warning
names (spill.py: the run's params, tags, metrics and copies of its artifacts), so a long training run never dies
of, or silently loses metrics to, a tracking outage; the next command that tracks to that server replays it.

Experiments are created as training ("custom model development") experiments, so MLflow 3's UI opens them on
the runs table, not on the GenAI overview.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
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
# MLflow 3's experiment type (the UI's "experiment kind"): a training experiment opens on the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"


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


def experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    """The id of experiment `name`, created if missing as a training experiment (EXPERIMENT_KIND_TAG); an existing
    one without a kind gets that kind too, while a kind someone chose is left alone."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            location = local_artifact_location(tracking_uri)
            tags = {EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND}
            return client.create_experiment(name, artifact_location=location, tags=tags)
        except MlflowException:  # created meanwhile by another process: use theirs
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND)
    return experiment.experiment_id


def by_step_metrics(metrics: Mapping[str, float], step: int) -> dict[str, float]:
    """Per-step values under names that carry the step ("val_loss_by_step" at t=3 -> "val_loss_by_step/t03").

    Logged beside the stepped series: MLflow's compare page shows each metric's last value only, so the series
    alone puts t=8 of one run beside t=6 of another; these names line the same t up across runs. Two digits
    keep t=10 after t=9 in the UI's alphabetical order."""
    return {f"{name}/t{step:02d}": value for name, value in metrics.items()}


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
        experiment = experiment_id(self.client, self.experiment, self.tracking_uri)
        run = self.client.create_run(experiment, start_time=self.start_ms, tags=tags, run_name=self.name)
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

    @property
    def spill_key(self) -> str:
        """This run's name in the spill folder (and its children's pointer to it while it has no run id)."""
        safe_name = re.sub(r"[^\w.-]", "_", self.name)
        return f"{safe_name}-{self.start_ms}-{os.getpid()}"

    def _spill(self, status: str) -> Path:
        from looplm.infra.spill import write_spill

        return write_spill(self, status)


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
