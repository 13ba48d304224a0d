"""The demo end to end at a small size: every stage runs and checks itself, and the model lands in the registry."""

import pytest
import torch

from looplm.model import load_pretrained
from looplm.pipelines.reference_train import TrainSettings
from looplm.platform.demo import DemoConfig, run


@pytest.mark.slow
def test_demo_runs_every_stage_and_registers_the_model(tmp_path, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    config = DemoConfig(
        output=str(tmp_path / "demo"),
        people=60,
        exposures=3,
        seq_len=64,
        stage1=TrainSettings(steps=40, batch_size=8, lr=3e-3, warmup_steps=4),
        stage2=TrainSettings(steps=5, batch_size=8, lr=1e-2, warmup_steps=1, stage="stage2"),
        thresholds=(0.0, 1.0),
        registered_name="looplm-demo-test",
    )
    result = run(config)
    assert result["roundtrip_exact"] and result["lm_unchanged_by_stage2"]
    assert all(a < b for a, b in zip(result["valid_after"], result["valid_before"], strict=True))
    assert result["exit_stats"][0.0]["mean_steps"] == 1.0 and result["exit_stats"][1.0]["mean_steps"] == 4.0
    registered = load_pretrained(result["registered"])
    saved = load_pretrained(tmp_path / "demo" / "checkpoint")
    ids = torch.randint(0, saved.config.vocab_size, (1, 12))
    assert all(torch.equal(a, b) for a, b in zip(registered(ids).logits, saved(ids).logits, strict=True))
