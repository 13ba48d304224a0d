"""The pretrain step on Ray Train: `looplm train` end to end, and a worker failure the job survives by resuming."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray.cloudpickle

from looplm.infra.configs import load_config
from looplm.model import LoopLM
from looplm.pipelines.pretrain import launch
from looplm.pipelines.training.config import PretrainConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "train-tiny-cpu.yaml")
SMALL = ["data.seq_len=32", "data.micro_batch_size=4", "data.global_batch_size=8", "train.log_interval=2"]


class FailOnce:
    """A worker callback: rank 1 raises once, when step `step` is logged (a marker file makes it once per job)."""

    def __init__(self, step: int, marker: Path):
        self.step, self.marker = step, marker

    def __call__(self, record: dict) -> None:
        import torch.distributed as dist

        if dist.get_rank() == 1 and record.get("step", 0) >= self.step and not self.marker.exists():
            self.marker.write_text(f"worker failure injected at step {record['step']}\n")
            raise RuntimeError(f"injected worker failure at step {record['step']} (test of FailureConfig)")


# Ray workers cannot import this test module: ship the callback's class by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["torch", "megatron"])
def test_two_worker_job_survives_an_injected_worker_failure_by_resuming(tmp_path, optimizer):
    overrides = SMALL + ["launch.data_parallel=2", "train.steps=16", "train.checkpoint_interval=5"]
    overrides.append(f"optim.implementation={optimizer}")  # megatron: the DistributedOptimizer's sharded state
    config = load_config(PretrainConfig, TINY, overrides)
    result = launch(config, tmp_path / "run", worker_callbacks=[FailOnce(10, tmp_path / "failed-once")])
    assert result.restarts == 1  # counted from the failures Ray Train reported, not from the marker
    (failure,) = [json.loads(line) for line in (tmp_path / "run" / "worker_failures.jsonl").read_text().splitlines()]
    assert failure["ranks"] == [1] and "injected worker failure at step 10" in failure["errors"]["1"]
    assert result.checkpoint is not None and result.checkpoint.name == "step_00000016"
    steps = [r["step"] for r in result.records if "loss" in r]
    assert steps == list(range(2, 17, 2))
    losses = [r["loss"] for r in result.records if "loss" in r]
    assert losses[-1] < losses[0]
    # Rank 1 failed while reporting step 10, before step 10's checkpoint: the restarted group resumed from step
    # 5's, so steps 6-10 were logged twice and steps 2-4 once (not retrained from scratch).
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in lines if "loss" in r]
    assert [logged.count(step) for step in (2, 4, 6, 8, 10, 12, 14, 16)] == [1, 1, 2, 2, 2, 1, 1, 1], logged


@pytest.mark.slow
def test_looplm_train_cli_trains_the_tiny_preset_and_its_loss_falls(tmp_path):
    output = tmp_path / "cli"
    command = [
        sys.executable,
        "-m",
        "looplm.platform.cli",
        "train",
        TINY,
        *SMALL,
        "train.steps=20",
        "--output",
        str(output),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "latest checkpoint:" in done.stdout
    progress = [line for line in done.stdout.splitlines() if line.startswith("step ") and "loss" in line]
    assert len(progress) >= 10  # every logged interval printed as it happened, plus validation
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.5, losses
    assert (output / "hf" / "config.json").is_file()
    assert (output / "training.png").stat().st_size > 10_000 and "training curves:" in done.stdout
    info = json.loads((output / "run_info.json").read_text())  # what the workers resolved "auto" to
    assert (info["device"], info["params_dtype"], info["optimizer"]) == ("cpu", "float32", "torch-adamw")


def test_metrics_reach_mlflow_once_per_job_from_the_driver(tmp_path):
    from mlflow import MlflowClient

    from looplm.pipelines.pretrain import PretrainResult, log_to_mlflow

    config = load_config(PretrainConfig, TINY)
    per_step = {"ce_step_1": 6.0, "ce_step_2": 5.0, "exit_prob_step_1": 0.3, "exit_prob_step_2": 0.7}
    records = [
        {"step": 2, "loss": 5.0, "grad_norm": 1.0, **per_step},
        {"step": 4, "loss": 4.0, "grad_norm": 0.5, **per_step},
    ]
    result = PretrainResult(tmp_path, [*records, {"step": 4, "valid_loss": 4.1}], None, 0)
    (tmp_path / "run_info.json").write_text(
        json.dumps({"optimizer": "megatron-distributed", "params_dtype": "bfloat16"})
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_to_mlflow(config, result, tracking_uri=uri)
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.tags["looplm.transformer_impl"] == "local"
    assert (run.data.tags["looplm.optimizer"], run.data.tags["looplm.params_dtype"]) == (
        "megatron-distributed",
        "bfloat16",
    )
    assert run.data.params["parallel.transformer_impl"] == "local"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(2, 5.0), (4, 4.0)]
    assert client.get_metric_history(run.info.run_id, "valid_loss")[0].value == 4.1
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/training.png"]


@pytest.mark.slow
def test_the_worker_group_is_tensor_by_pipeline_by_data_parallel(tmp_path):
    """PP=2 x DP=1: two Ray Train workers, one per pipeline stage; the job trains and exports the whole model."""
    overrides = ["data.seq_len=32", "data.micro_batch_size=2", "data.global_batch_size=4", "train.log_interval=1"]
    overrides += ["parallel.pipeline_parallel=2", "train.steps=2", "loop.recurrent_steps=[[0, 2]]"]
    result = launch(load_config(PretrainConfig, TINY, overrides), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["world_size"] == 2
    assert [r["step"] for r in result.records if "loss" in r] == [1, 2] and result.restarts == 0
    assert LoopLM.from_pretrained(tmp_path / "run" / "hf").config.num_hidden_layers == 2
