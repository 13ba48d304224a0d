"""Evaluation of looped models: per-step figures, early-exit curves, and `looplm eval` logging to MLflow."""

from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from looplm.model import load_pretrained
from looplm.model.checkpoint import CheckpointError
from looplm.pipelines.evaluate import EvalConfig, ExitGrid, evaluate_model, run
from looplm.pipelines.reference_train import per_step_validation
from looplm.platform.cli import main as looplm_main

GRID = ExitGrid(q_thresholds=(0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))


@pytest.fixture(scope="module")
def table(trained_tiny):
    model = load_pretrained(trained_tiny.stage2)
    stage1 = load_pretrained(trained_tiny.stage1)
    return evaluate_model(model, trained_tiny.valid, max_steps=6, exits=GRID, stage1_model=stage1)


def _rows(table, kind, gate="model"):
    return [r for r in table if r["kind"] == kind and (kind == "step" or r["gate"] == gate)]


@pytest.mark.slow  # trains the session's tiny model
def test_per_step_loss_matches_the_training_code_and_extrapolates(table, trained_tiny):
    steps = _rows(table, "step")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["extrapolated"] for r in steps] == [False] * 4 + [True] * 2
    # Independent computation: the training loop's own per-step validation (stage1_loss's CE per step).
    reference = per_step_validation(load_pretrained(trained_tiny.stage2), trained_tiny.valid, num_steps=6)
    assert torch.allclose(torch.tensor([r["loss"] for r in steps]), reference.double().float(), atol=1e-5)
    for r in steps:
        assert r["ppl"] == pytest.approx(torch.tensor(r["loss"]).exp().item(), rel=1e-6)
        assert 0.0 < r["acc"] < 1.0
    flops = [r["flops_per_token"] for r in steps]
    assert all(b > a for a, b in zip(flops, flops[1:], strict=False))


@pytest.mark.slow  # trains the session's tiny model
@pytest.mark.parametrize("gate", ["model", "stage1"])
def test_q_exit_steps_fall_with_q_and_q1_equals_full_T_exactly(table, gate):
    curve = sorted(_rows(table, "qexit", gate), key=lambda r: r["threshold"])
    assert [r["threshold"] for r in curve] == list(GRID.q_thresholds)
    averages = [r["avg_steps"] for r in curve]
    assert all(a <= b for a, b in zip(averages, averages[1:], strict=False)), averages
    assert averages[0] == 1.0 and averages[-1] == 4.0
    assert len(set(averages)) >= 4, "a trained gate spreads exits over several steps"
    full = next(r for r in _rows(table, "step") if r["step"] == 4)
    at_one = curve[-1]
    for key in ("avg_steps", "loss", "ppl", "acc", "flops_per_token"):
        assert at_one[key] == full[key], key  # exact, not approximate
    first = next(r for r in _rows(table, "step") if r["step"] == 1)
    assert curve[0]["loss"] == first["loss"]  # q = 0 exits every token at step 1
    for r in curve:
        assert sum(r[f"exit_frac_t{t}"] for t in range(1, 5)) == pytest.approx(1.0)


@pytest.mark.slow  # trains the session's tiny model
def test_stage2_gate_differs_from_stage1_gate(table):
    stage1 = [r["avg_steps"] for r in _rows(table, "qexit", "stage1")]
    stage2 = [r["avg_steps"] for r in _rows(table, "qexit", "model")]
    assert stage1 != stage2


@pytest.mark.slow  # trains the session's tiny model
def test_hidden_difference_exits_earlier_as_epsilon_grows(table):
    curve = sorted(_rows(table, "hdiff"), key=lambda r: r["threshold"])
    assert len(curve) == len(ExitGrid().hdiff_quantiles)
    averages = [r["avg_steps"] for r in curve]
    assert all(a >= b for a, b in zip(averages, averages[1:], strict=False)), averages
    assert averages[0] > averages[-1]
    assert all(1.0 <= a <= 4.0 for a in averages)


def test_bad_eval_config_and_missing_checkpoint_are_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nexits:\n  q_threshold: [0.5]\n")
    assert looplm_main(["eval", str(bad)]) == 2  # the CLI prints a config error, without a traceback
    assert "q_threshold" in capsys.readouterr().err
    assert looplm_main(["eval", str(bad), "exits={q_thresholds: [1.5]}"]) == 2
    assert "not in" in capsys.readouterr().err
    with pytest.raises(ValueError, match="histogram_thresholds"):
        EvalConfig(exits=ExitGrid(q_thresholds=(0.5, 1.0), histogram_thresholds=(0.3,)))
    with pytest.raises(CheckpointError, match="nowhere"):
        run(EvalConfig(model=str(tmp_path / "nowhere")))


@pytest.mark.slow
def test_looplm_eval_logs_to_the_current_tracking_server(trained_tiny, mlflow_server, tmp_path, monkeypatch):
    config = {
        "model": str(trained_tiny.stage2),
        "stage1_model": str(trained_tiny.stage1),
        "experiment": "test-eval-cli",
        "data": {"people": 40, "seq_len": 64, "max_sequences": 8},
        "lm_eval": {"tasks": ["looplm_bios_city"], "steps": [1, 4], "limit": 4},
        "reasoning": {"tasks": ["multihop", "mano"], "count": 6, "mano_operators": 3},
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    assert looplm_main(["eval", str(path), "max_steps=6", "run_name=cli-eval", "--output", str(tmp_path / "out")]) == 0

    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("test-eval-cli")
    parent = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'cli-eval'")[0]
    assert parent.data.params["max_steps"] == "6" and parent.data.params["data.people"] == "40"
    child = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )[0]
    assert child.info.run_name == "cli-eval/evaluate" and child.data.tags["looplm.step"] == "evaluate"
    steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "val_loss_by_step"))
    assert steps == [1, 2, 3, 4, 5, 6]
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "qexit_avg_steps")) == sorted(
        round(100 * q) for q in ExitGrid().q_thresholds
    )
    assert len(client.get_metric_history(child.info.run_id, "stage1_qexit_loss")) == len(ExitGrid().q_thresholds)
    lm_eval_steps = client.get_metric_history(child.info.run_id, "lm_eval/looplm_bios_city/acc")
    assert sorted(m.step for m in lm_eval_steps) == [1, 4]
    for task in ("multihop", "mano"):
        history = client.get_metric_history(child.info.run_id, f"exact_match_{task}_by_step")
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    plots = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
    assert plots == {"plots/loss_by_step.png", "plots/compute_quality.png", "plots/exit_histogram.png"}
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"eval_table.csv", "eval_table.json", "config.json"} <= artifacts
    local = client.download_artifacts(child.info.run_id, "plots/compute_quality.png", str(tmp_path))
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "eval_table.csv").read_text().startswith("kind,")
