"""The MLflow tracking server component: a real `mlflow server` subprocess on 127.0.0.1."""

import os
import signal
import subprocess
import sys

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
def test_looplm_mlflow_command_serves_until_sigterm_then_stops_cleanly(tmp_path):
    command = [sys.executable, "-m", "looplm.platform.cli", "mlflow", "--output", str(tmp_path / "store")]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = None
        for line in process.stdout:
            if line.startswith("MLflow UI at "):
                url = line.split()[-1]
                break
        assert url is not None and url.startswith("http://127.0.0.1:")
        assert is_healthy(url)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert not is_healthy(url, timeout_s=0.5)
    finally:
        if process.poll() is None:
            process.kill()
