"""Runs, nested runs, params, code version and outage tolerance, against a real MLflow server."""

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from looplm.infra.mlflow_server import MlflowServer, MlflowServerConfig, free_port
from looplm.infra.tracking import RunLogger, code_version, flatten_params, pipeline_run, step_run

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Inner:
    steps: int = 3
    thresholds: tuple[float, ...] = (0.5, 1.0)


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "x"
    lr: float = 1e-3
    inner: Inner = Inner()


def test_flatten_params_gives_dotted_keys_and_json_values():
    flat = flatten_params(Outer(inner=Inner(steps=7)))
    assert flat == {"name": "x", "lr": "0.001", "inner.steps": "7", "inner.thresholds": "[0.5, 1.0]"}
    assert len(flatten_params({"long": "y" * 10_000})["long"]) == 6000


def test_code_version_is_the_checkout_commit_and_dirty_flag():
    tags = code_version(REPO)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head
    assert tags["looplm.git_dirty"] in ("true", "false")
    assert code_version("/")["looplm.git_dirty"] == "unknown"


@pytest.mark.slow  # starts the session's server
def test_pipeline_run_with_nested_step_runs(mlflow_server):
    config = Outer(inner=Inner(steps=5))
    with pipeline_run("pipeline", config=config, experiment="test-tracking", tracking_uri=mlflow_server.url) as run:
        with step_run(run, "evaluate", config=config.inner) as step:
            for t in range(1, 4):
                step.log_metrics({"val_loss_by_step": 3.0 - t}, step=t)
        with step_run(run, "register"):
            pass
    client = MlflowClient(mlflow_server.url)
    parent = client.get_run(run.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params == flatten_params(config)
    assert parent.data.tags["mlflow.source.git.commit"] == code_version()["mlflow.source.git.commit"]
    assert parent.data.tags["looplm.git_dirty"] in ("true", "false")
    assert "config.json" in {a.path for a in client.list_artifacts(run.run_id)}
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.run_id}'"
    )
    assert sorted(c.info.run_name for c in children) == ["pipeline/evaluate", "pipeline/register"]
    assert sorted(c.data.tags["looplm.step"] for c in children) == ["evaluate", "register"]
    history = client.get_metric_history(step.run_id, "val_loss_by_step")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 2.0), (2, 1.0), (3, 0.0)]
    assert client.get_run(step.run_id).data.params == {"steps": "5", "thresholds": "[0.5, 1.0]"}


@pytest.mark.slow  # starts the session's server
def test_a_failing_step_marks_its_run_failed(mlflow_server):
    with (
        pytest.raises(RuntimeError, match="boom"),
        pipeline_run("failing", experiment="test-tracking", tracking_uri=mlflow_server.url) as run,
    ):
        raise RuntimeError("boom")
    assert MlflowClient(mlflow_server.url).get_run(run.run_id).info.status == "FAILED"


def test_server_down_from_the_start_spills_to_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPLM_TRACKING_SPILL_DIR", str(tmp_path))
    run = RunLogger(f"http://127.0.0.1:{free_port()}", "offline")
    run.log_params({"a": 1})
    for step in range(5):
        run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)  # never raises, never blocks for long
    assert run.is_down
    spill = run.close()
    lines = [json.loads(line) for line in spill.read_text().splitlines()]
    assert lines[1]["params"] == {"a": "1"}
    assert [x["step"] for x in lines if "metric" in x] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_an_outage_mid_run_loses_nothing(tmp_path, monkeypatch):
    """Log, stop the server, keep logging, start it again on the same store: every metric arrives. A second run
    that ends during the outage is spilled and replayed into the run the server already had."""
    from looplm.infra.spill import replay_spills

    monkeypatch.setenv("LOOPLM_TRACKING_SPILL_DIR", str(tmp_path / "spill"))
    port = free_port()
    config = MlflowServerConfig(root=str(tmp_path / "store"), port=port)
    server = MlflowServer(config).start()
    try:
        run = RunLogger(server.url, "train", experiment="outage", flush_interval_s=0.0)
        ended = RunLogger(server.url, "ended", experiment="outage", flush_interval_s=0.0)
        for logger in (run, ended):
            logger.log_metrics({"loss": 1.0}, step=0)
            assert not logger.is_down
        server.stop()
        for step in (1, 2, 3):
            for logger in (run, ended):
                logger.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        assert run.is_down
        assert ended.close() is not None  # spilled, with the run id the server gave it
        server = MlflowServer(config).start()
        assert run.close() is None
        client = MlflowClient(server.url)
        history = client.get_metric_history(run.run_id, "loss")
        assert sorted(m.step for m in history) == [0, 1, 2, 3]
        assert client.get_run(run.run_id).info.status == "FINISHED"
        assert client.get_run(ended.run_id).info.status == "RUNNING"  # until its spill is replayed
        (replayed,) = replay_spills(server.url)
        assert replayed.run_id == ended.run_id and replayed.metrics == 3
        assert sorted(m.step for m in client.get_metric_history(ended.run_id, "loss")) == [0, 1, 2, 3]
        assert client.get_run(ended.run_id).info.status == "FINISHED"
    finally:
        server.stop()


def test_a_sqlite_store_keeps_artifacts_beside_the_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    with pipeline_run("local", config={"a": 1}, experiment="local-store", tracking_uri=uri) as run:
        run.log_metrics({"x": 1.0}, step=1)
    assert (tmp_path / "store" / "artifacts").is_dir()
    assert not (tmp_path / "mlruns").exists()
    assert [a.path for a in MlflowClient(uri).list_artifacts(run.run_id)] == ["config.json"]


def test_a_step_in_another_process_nests_under_the_pipeline_run_by_id(mlflow_server):
    """What the executor does: the driver opens the pipeline run, a Ray task attaches to it by id and nests a step
    run; the attached handle neither renames nor closes the parent."""
    from looplm.infra.tracking import attached_run

    client = MlflowClient(mlflow_server.url)
    with pipeline_run("dag", experiment="test-tracking", tracking_uri=mlflow_server.url) as run:
        assert run.flush()
        parent = attached_run(mlflow_server.url, run.run_id, "dag", experiment="test-tracking")
        with step_run(parent, "train", config=Inner(steps=5)) as step:
            step.log_metrics({"loss": 1.5}, step=1)
        assert client.get_run(run.run_id).info.status == "RUNNING"  # the parent is the driver's to close
    nested = client.get_run(step.run_id)
    assert nested.data.tags["mlflow.parentRunId"] == run.run_id and nested.info.run_name == "dag/train"
    assert nested.data.params["steps"] == "5" and nested.data.metrics["loss"] == 1.5
    assert client.get_run(run.run_id).info.status == "FINISHED" and client.get_run(run.run_id).info.run_name == "dag"
