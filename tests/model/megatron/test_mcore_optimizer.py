"""megatron-core's optimizer in the trainer (the GPU code path, run on CPU through cpu_shim), on real gloo groups.

The independent computation is the trainer's torch AdamW path over the same Megatron DDP gradients: the
DistributedOptimizer (state sharded over DP, reduce-scattered gradients) and the non-distributed Megatron
optimizer must train identically, and their checkpoints must resume and reshard exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _mcore_spawn import run_ranks
from _mcore_workers import train, train_expecting_error

from looplm.infra.configs import load_config
from looplm.model import LoopLM
from looplm.pipelines.training.config import PretrainConfig

ROOT = Path(__file__).resolve().parents[3]
TINY = str(ROOT / "configs" / "train-tiny-cpu.yaml")


def _config(*overrides: str) -> PretrainConfig:
    small = ["data.seq_len=32", "data.micro_batch_size=2", "data.global_batch_size=8", "train.log_interval=1"]
    return load_config(PretrainConfig, TINY, small + list(overrides))


def _losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _max_relative_difference(a: Path, b: Path) -> float:
    left, right = LoopLM.from_pretrained(a).state_dict(), LoopLM.from_pretrained(b).state_dict()
    return max(((left[n] - right[n]).norm() / right[n].norm()).item() for n in right)


def test_megatron_optimizers_train_like_torch_adamw(tmp_path):
    """DP=2, 6 steps with weight decay and clipping: same losses, grad norms and final weights (rel 1e-5)."""
    base = ("train.steps=6", "train.checkpoint_interval=6", "launch.data_parallel=2", "optim.grad_clip=2.0")
    megatron = (*base, "optim.implementation=megatron")
    runs = [
        (_config(*base, "optim.implementation=torch"), str(tmp_path / "torch"), None),
        (_config(*megatron), str(tmp_path / "distributed"), None),
        (_config(*megatron, "optim.distributed=false"), str(tmp_path / "plain"), None),
        (_config(*megatron, "optim.weight_decay=0"), str(tmp_path / "nowd"), None),
    ]
    reference, distributed, plain, _ = run_ranks(train, 2, tmp_path, runs=runs)[0]
    assert any(r["grad_norm"] > 2.0 for r in reference if "loss" in r)  # clipping is exercised
    for records in (distributed, plain):
        assert _losses(records).keys() == _losses(reference).keys()
        for step, loss in _losses(reference).items():
            assert _losses(records)[step] == pytest.approx(loss, rel=1e-5), step
        norms = [(r["grad_norm"], s["grad_norm"]) for r, s in zip(records, reference, strict=True) if "loss" in r]
        assert all(a == pytest.approx(b, rel=1e-5) for a, b in norms)
    for name in ("distributed", "plain"):
        assert _max_relative_difference(tmp_path / name / "hf", tmp_path / "torch" / "hf") < 1e-5
        info = json.loads((tmp_path / name / "run_info.json").read_text())
        assert info["optimizer"] == {"distributed": "megatron-distributed", "plain": "megatron"}[name]
    # The check can fail: without weight decay the weights move measurably differently.
    assert _max_relative_difference(tmp_path / "nowd" / "hf", tmp_path / "torch" / "hf") > 1e-4


@pytest.mark.slow
def test_distributed_optimizer_resumes_exactly_and_reshards(tmp_path):
    """DP=2 DistributedOptimizer: 12 steps straight vs. a crash after step 9 (latest checkpoint: 8) and a resume,
    on the same layout (exact) and at TP=2 x DP=1 (the sharded fp32 main params and moments resharded)."""
    common = ("train.steps=12", "train.checkpoint_interval=4", "optim.implementation=megatron")
    config = _config(*common, "launch.data_parallel=2")
    tensor_parallel = ("parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "data.micro_batch_size=4")
    relayout = _config(*common, *tensor_parallel)
    resumed, moved = str(tmp_path / "resumed"), str(tmp_path / "moved")
    runs = [(config, str(tmp_path / "straight"), None), (config, resumed, 9), (config, moved, 9)]
    runs += [(config, resumed, None), (relayout, moved, None)]
    straight, crashed, _, resumed_records, moved_records = run_ranks(train, 2, tmp_path, runs=runs)[0]
    losses = _losses(straight)
    assert sorted(_losses(crashed)) == list(range(1, 10))
    assert sorted(_losses(resumed_records)) == list(range(9, 13))
    for step, loss in _losses(resumed_records).items():
        assert loss == pytest.approx(losses[step], rel=1e-6, abs=1e-6), step
    assert sorted(_losses(moved_records)) == list(range(9, 13))
    for step, loss in _losses(moved_records).items():
        assert loss == pytest.approx(losses[step], rel=1e-5), step
    trainer_json = json.loads((tmp_path / "straight" / "checkpoints" / "step_00000012" / "trainer.json").read_text())
    assert trainer_json["optimizer"] == "megatron-distributed"


@pytest.mark.slow
@pytest.mark.parametrize("distributed", [True, False])
def test_bf16_params_train_with_fp32_main_params_and_resume_exactly(tmp_path, distributed):
    """bf16 params (the GPU precision) with the optimizer's fp32 main params (the DistributedOptimizer, or
    Float16OptimizerWithFloat16Params): close to the fp32 run, and a resumed run is exact, which it could not be if
    the fp32 main params were rebuilt from bf16 weights."""
    common = (
        "train.steps=8",
        "train.checkpoint_interval=4",
        "launch.data_parallel=2",
        f"optim.distributed={distributed}",
    )
    bf16 = _config(*common, "parallel.precision=bf16")
    fp32 = _config(*common)
    resumed = str(tmp_path / "resumed")
    runs = [(bf16, str(tmp_path / "bf16"), None), (fp32, str(tmp_path / "fp32"), None)]
    runs += [(bf16, resumed, 6), (bf16, resumed, None)]
    straight, reference, _, resumed_records = run_ranks(train, 2, tmp_path, runs=runs)[0]
    info = json.loads((tmp_path / "bf16" / "run_info.json").read_text())
    expected = "megatron-distributed" if distributed else "megatron"
    assert (info["params_dtype"], info["optimizer"]) == ("bfloat16", expected)
    assert LoopLM.from_pretrained(tmp_path / "bf16" / "hf").model.norm.weight.dtype == torch.bfloat16
    for step, loss in _losses(reference).items():
        assert _losses(straight)[step] == pytest.approx(loss, rel=2e-3), step
    assert _losses(straight)[8] < _losses(straight)[1]
    for step, loss in _losses(resumed_records).items():
        assert loss == pytest.approx(_losses(straight)[step], rel=1e-6, abs=1e-6), step


def test_resuming_with_another_optimizer_is_refused(tmp_path):
    output = str(tmp_path / "run")
    run_ranks(train, 1, tmp_path, runs=[(_config("train.steps=2", "optim.implementation=torch"), output, None)])
    config = _config("train.steps=4", "optim.implementation=megatron")
    (message,) = run_ranks(train_expecting_error, 1, tmp_path, config=config, output=output)
    assert "holds torch-adamw optimizer state but this run steps with megatron-distributed" in message, message


def test_optimizer_config_errors_name_the_field():
    with pytest.raises(ValueError, match="optim.implementation must be one of"):
        _config("optim.implementation=adam")
    with pytest.raises(ValueError, match="optim.implementation=.torch. steps fp32 params only"):
        _config("optim.implementation=torch", "parallel.precision=bf16")


def test_the_optimizer_patch_refuses_a_megatron_source_it_does_not_know():
    """The source rewrite counts what it rewrites; a different count (another megatron-core) is an error."""
    script = (
        "from looplm.model.megatron import cpu_shim\n"
        "cpu_shim._OPTIMIZER_MODULES['megatron.core.optimizer.clip_grads'] += 1\n"
        "cpu_shim.patch_megatron_optimizer()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "clip_grads holds 6 CUDA-only strings, expected 7" in result.stderr, result.stderr[-2000:]
