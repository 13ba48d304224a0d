"""Tracking that catches up (issue 12), against real `mlflow server` processes on 127.0.0.1.

- a run that ends while the server is down is spilled with copies of its artifacts; spills meant for the server
  a command checks at start are sent to it (tests/infra/test_mlflow_server.py: `looplm mlflow` on the port
  they were meant for sends them, nested as they were, and says so); spills meant for another server wait
  for the explicit replay (`python -m looplm.infra.spill URI --any-server`);
- `looplm mlflow`: a stable default port, `--port`, and one clear line when the port is taken (by MLflow: in
  tests/infra/test_mlflow_server.py);
- every tracking command refuses a dead tracking URI before work starts (eval through ensure_tracking_server;
  train through check_tracking_server, once pretrain calls it);
- `looplm eval` that fails before work starts (an unknown model) leaves no run behind;
- experiments are training experiments (MLflow 3's experiment kind), so the UI opens on the runs table;
- per-recurrent-step metrics line up by t on the compare page (each metric's latest value) across runs that
  evaluated different numbers of steps.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from looplm.infra import mlflow_server as server_module
from looplm.infra.mlflow_server import MlflowServerError, check_tracking_server
from looplm.infra.spill import main as spill_main
from looplm.infra.spill import pending_spills, read_spill, replay_spills
from looplm.infra.tracking import (
    EXPERIMENT_KIND_TAG,
    TRAINING_EXPERIMENT_KIND,
    RunLogger,
    pipeline_run,
    step_run,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def spill_folder(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "spill"
    monkeypatch.setenv("LOOPLM_TRACKING_SPILL_DIR", str(folder))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return folder


def dead_uri() -> str:
    return f"http://127.0.0.1:{server_module.free_port()}"


def spill_a_pipeline(uri: str, experiment: str) -> None:
    """A pipeline run with a nested step run, a config artifact each and a figure-like text artifact, all while
    `uri` does not answer: both runs are spilled."""
    with (
        pipeline_run("outage", config={"lr": 0.001}, experiment=experiment, tracking_uri=uri) as parent,
        step_run(parent, "train", config={"steps": 3}) as step,
    ):
        for t in (1, 2, 3):
            step.log_metrics({"loss": 1.0 / t}, step=t)
        step.log_text("curve\n", "plots/curve.txt")
    assert parent.is_down and step.is_down


def test_a_spill_keeps_copies_of_its_artifacts_outside_the_temp_folder(spill_folder):
    run = RunLogger(dead_uri(), "offline")
    run.log_dict({"a": 1}, "config.json")  # staged in the system temp folder, like every logged figure
    staged = run._artifacts[0][0]
    assert staged.startswith(tempfile.gettempdir())
    spill = read_spill(run.close())
    assert not Path(staged).exists(), "the run's staging folder is cleaned up once the spill holds a copy"
    ((copy, folder),) = spill.artifacts
    assert copy.is_relative_to(spill_folder) and json.loads(copy.read_text()) == {"a": 1} and folder is None
    assert not any(p.name.endswith(".partial") for p in spill_folder.iterdir())


def test_looplm_mlflow_on_a_port_another_program_holds_says_so(tmp_path, capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert server_module.run_from_args(argparse.Namespace(port=port, output=str(tmp_path))) == 2
    message = capsys.readouterr().err.strip().splitlines()
    assert message == [
        f"looplm mlflow: port {port} on 127.0.0.1 is taken by another program; choose a free one with --port N "
        "(--port 0: any free port)"
    ]
    assert not (tmp_path / "mlflow.db").exists()  # no server was started


def test_looplm_mlflow_has_a_stable_default_port_and_a_port_option():
    from looplm.platform.cli import build_parser

    assert build_parser().parse_args(["mlflow"]).port is None
    assert build_parser().parse_args(["mlflow", "--port", "5123"]).port == 5123
    assert server_module.DEFAULT_PORT == 5000  # MLflow's own default: the same address after every restart


@pytest.mark.slow  # the session's server
def test_spills_meant_for_another_server_wait_for_the_explicit_replay(mlflow_server, capsys):
    spill_a_pipeline(dead_uri(), "explicit-replay")
    assert check_tracking_server(mlflow_server.url) == mlflow_server.url
    assert "2 run(s) kept during a tracking outage still wait" in capsys.readouterr().err
    assert len(pending_spills()) == 2  # not the session server's runs: left alone
    assert spill_main([mlflow_server.url, "--any-server"]) == 0
    assert "sent 2 run(s)" in capsys.readouterr().out
    assert pending_spills() == []
    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("explicit-replay")
    names = sorted(r.info.run_name for r in client.search_runs([experiment.experiment_id]))
    assert names == ["outage", "outage/train"]
    assert replay_spills(mlflow_server.url, any_server=True) == []  # delivered once, not twice


def test_every_tracking_command_refuses_a_dead_tracking_uri_at_start(monkeypatch):
    uri = dead_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(MlflowServerError, match=f"MLFLOW_TRACKING_URI={uri} does not answer"):
        check_tracking_server()
    with pytest.raises(MlflowServerError, match=uri):
        server_module.ensure_tracking_server()  # `looplm eval` and the demo
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert check_tracking_server() is None  # nothing set: nothing to track to, nothing to refuse


@pytest.mark.skipif(
    "check_tracking_server" not in (REPO / "pipelines" / "pretrain.py").read_text(),
    reason="waits for the one-line call `check_tracking_server()` at the start of pretrain.run_from_args",
)
def test_looplm_train_refuses_a_dead_tracking_uri_before_starting_ray(tmp_path):
    uri = dead_uri()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    command = [sys.executable, "-m", "looplm.platform.cli", "train", "configs/train-tiny-cpu.yaml"]
    done = subprocess.run(
        [*command, "--output", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert f"MLFLOW_TRACKING_URI={uri} does not answer" in done.stderr
    assert "Started a local Ray instance" not in done.stderr + done.stdout
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.slow  # the session's server
def test_eval_of_an_unknown_model_leaves_no_failed_run(mlflow_server, monkeypatch, tmp_path, capsys):
    from looplm.pipelines import evaluate

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    experiment = f"eval-unknown-{uuid.uuid4().hex[:8]}"
    missing = tmp_path / "no-such-model"
    args = argparse.Namespace(
        config=str(REPO / "configs" / "eval-demo.yaml"),
        overrides=[f"model={missing}", f"experiment={experiment}"],
        output=None,
    )
    assert evaluate.run_from_args(args) == 2
    assert str(missing) in capsys.readouterr().err
    client = MlflowClient(mlflow_server.url)
    found = client.get_experiment_by_name(experiment)
    assert found is None or client.search_runs([found.experiment_id]) == []


@pytest.mark.slow  # the session's server
def test_experiments_are_created_as_training_experiments(mlflow_server):
    client = MlflowClient(mlflow_server.url)
    name = f"kind-{uuid.uuid4().hex[:8]}"
    with pipeline_run("kind", experiment=name, tracking_uri=mlflow_server.url):
        pass
    assert client.get_experiment_by_name(name).tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT_KIND
    # One created without a kind (by MLflow itself, an older looplm) gets it; one whose kind was chosen keeps it.
    untyped, genai = f"untyped-{uuid.uuid4().hex[:8]}", f"genai-{uuid.uuid4().hex[:8]}"
    client.create_experiment(untyped)
    client.create_experiment(genai, tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for experiment in (untyped, genai):
        with pipeline_run("kind", experiment=experiment, tracking_uri=mlflow_server.url):
            pass
    assert client.get_experiment_by_name(untyped).tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT_KIND
    assert client.get_experiment_by_name(genai).tags[EXPERIMENT_KIND_TAG] == "genai_development"


@pytest.mark.slow  # the session's server
def test_per_step_metrics_line_up_by_step_on_the_compare_page(mlflow_server):
    """Two evaluations, to t=8 and to t=6: the compare page shows each metric's latest value, so the stepped
    series alone shows t=8 beside t=6; the per-step names put the same t side by side."""
    from looplm.model import LoopLM, LoopLMConfig
    from looplm.pipelines.evaluate import ExitGrid, evaluate_model, log_report

    model = LoopLM(LoopLMConfig.preset("tiny")).eval()
    rows = torch.randint(0, model.config.vocab_size, (4, 17))
    exits = ExitGrid(q_thresholds=(0.5, 1.0), hdiff_epsilons=(0.1,), histogram_thresholds=(0.5,))
    client = MlflowClient(mlflow_server.url)
    experiment = f"compare-{uuid.uuid4().hex[:8]}"
    latest, tables = {}, {}
    for max_steps in (8, 6):
        tables[max_steps] = evaluate_model(model, rows, max_steps=max_steps, exits=exits, batch_size=4)
        with pipeline_run(f"eval-{max_steps}", experiment=experiment, tracking_uri=mlflow_server.url) as run:
            log_report(run, tables[max_steps], model.config.total_ut_steps, exits)
        latest[max_steps] = client.get_run(run.run_id).data.metrics
    by_step = {n: {r["step"]: r for r in tables[n] if r["kind"] == "step"} for n in tables}
    assert latest[8]["val_loss_by_step"] == pytest.approx(by_step[8][8]["loss"])  # the misalignment, as it was
    assert latest[6]["val_loss_by_step"] == pytest.approx(by_step[6][6]["loss"])
    for t in range(1, 7):
        for n in (8, 6):
            assert latest[n][f"val_loss_by_step/t{t:02d}"] == pytest.approx(by_step[n][t]["loss"])
            assert latest[n][f"val_acc_by_step/t{t:02d}"] == pytest.approx(by_step[n][t]["acc"])
    assert "val_loss_by_step/t08" in latest[8] and "val_loss_by_step/t07" not in latest[6]
