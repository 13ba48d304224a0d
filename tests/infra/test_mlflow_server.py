"""The MLflow tracking server component: a real `mlflow server` subprocess on 127.0.0.1."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from looplm.infra.mlflow_server import (
    MlflowServer,
    MlflowServerConfig,
    MlflowServerError,
    ensure_tracking_server,
    free_port,
    is_healthy,
)


def _group_commands(pgid: int) -> list[str]:
    ps = subprocess.run(["ps", "-o", "pgid=,args=", "-A"], capture_output=True, text=True, check=True).stdout
    return [line.split(None, 1)[1] for line in ps.splitlines() if line.split(None, 1)[0] == str(pgid)]


@pytest.mark.slow
def test_server_starts_healthy_without_job_consumers_and_stops_its_process_group(tmp_path):
    server = MlflowServer(MlflowServerConfig(root=str(tmp_path / "store"))).start()
    try:
        assert server.url.startswith("http://127.0.0.1:")
        assert is_healthy(server.url)
        commands = _group_commands(server.pid)
        assert any("mlflow" in c and "server" in c for c in commands)
        assert not any("huey" in c for c in commands), commands  # job consumers off (ray-mlflow-notes.md §6)
        assert (tmp_path / "store" / "mlflow.db").is_file()  # the default sqlite backend store
        pid = server.pid
    finally:
        server.stop()
    assert not is_healthy(server.url, timeout_s=0.5)
    assert _group_commands(pid) == []
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)


@pytest.mark.slow  # starts the session's server
def test_existing_server_is_reused_through_the_environment(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    uri, started = ensure_tracking_server()
    assert uri == mlflow_server.url and started is None


def test_a_tracking_uri_that_does_not_answer_is_an_error(monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    with pytest.raises(MlflowServerError, match=dead):
        ensure_tracking_server()


def test_a_server_that_cannot_start_reports_its_log(tmp_path):
    config = MlflowServerConfig(root=str(tmp_path), backend_store_uri="nosuchscheme://x", startup_timeout_s=60)
    with pytest.raises(MlflowServerError, match="exited with code"):
        MlflowServer(config).start()


def test_bad_server_config_names_the_field():
    with pytest.raises(ValueError, match="port"):
        MlflowServerConfig(port=70000)
    with pytest.raises(ValueError, match="workers"):
        MlflowServerConfig(workers=0)


@pytest.mark.slow
def test_looplm_mlflow_serves_on_its_port_sends_spilled_runs_and_stops_cleanly(tmp_path):
    """`looplm mlflow --port P` after runs meant for P were spilled during an outage: the server comes up on P,
    sends them (nested as they were, artifacts included) and says so; a second `looplm mlflow --port P` is one
    line and exit 2; SIGTERM stops the server."""
    from mlflow.tracking import MlflowClient

    from looplm.infra.spill import pending_spills
    from looplm.infra.tracking import PARENT_TAG, pipeline_run, step_run

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["LOOPLM_TRACKING_SPILL_DIR"] = str(tmp_path / "spill")
    session_spill = os.environ.get("LOOPLM_TRACKING_SPILL_DIR")
    os.environ["LOOPLM_TRACKING_SPILL_DIR"] = env["LOOPLM_TRACKING_SPILL_DIR"]
    try:  # a pipeline run and its step run, ended while nothing answers at `url`: both spilled
        with (
            pipeline_run("outage", config={"lr": 0.001}, experiment="catch-up", tracking_uri=url) as run,
            step_run(run, "train", config={"steps": 3}) as step,
        ):
            for t in (1, 2, 3):
                step.log_metrics({"loss": 1.0 / t}, step=t)
            step.log_text("curve\n", "plots/curve.txt")
        assert len(pending_spills()) == 2
    finally:
        if session_spill is None:
            del os.environ["LOOPLM_TRACKING_SPILL_DIR"]
        else:
            os.environ["LOOPLM_TRACKING_SPILL_DIR"] = session_spill
    command = [sys.executable, "-m", "looplm.platform.cli", "mlflow", "--output", str(tmp_path / "store")]
    process = subprocess.Popen(
        [*command, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        lines = []
        for line in process.stdout:
            lines.append(line.rstrip())
            if line.startswith("  outage/train (run "):
                break
        assert f"MLflow UI at {url}" in lines
        assert f"sent 2 run(s) that reached no tracking server before to {url}:" in lines
        assert is_healthy(url)
        assert list((tmp_path / "spill").iterdir()) == []
        client = MlflowClient(url)
        experiment = client.get_experiment_by_name("catch-up")
        runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
        parent, child = runs["outage"], runs["outage/train"]
        assert parent.info.status == child.info.status == "FINISHED"
        assert child.data.tags[PARENT_TAG] == parent.info.run_id
        assert parent.data.params == {"lr": "0.001"} and child.data.params == {"steps": "3"}
        history = client.get_metric_history(child.info.run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
        curve = client.download_artifacts(child.info.run_id, "plots/curve.txt", str(tmp_path / "down"))
        assert Path(curve).read_text() == "curve\n"

        again = subprocess.run([*command, "--port", str(port)], capture_output=True, text=True, env=env, timeout=60)
        assert again.returncode == 2 and again.stdout == ""
        assert again.stderr.strip() == (
            f"looplm mlflow: an MLflow server already answers at {url}: use it "
            f"(export MLFLOW_TRACKING_URI={url}), or start another one with --port N"
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert not is_healthy(url, timeout_s=0.5)
    finally:
        if process.poll() is None:
            process.kill()
