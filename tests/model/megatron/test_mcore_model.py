"""The Megatron LoopLM's configuration surface: what it accepts, what it rejects (naming the field), the shim."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _mcore_spawn import run_ranks
from _mcore_workers import saved_logit_tensors

from looplm.model import LoopLMConfig
from looplm.model.config import ConfigError
from looplm.model.megatron import cpu_shim
from looplm.model.megatron.config import ParallelConfig
from looplm.model.megatron.layer_specs import sandwich_layer_spec


def test_tensor_parallel_must_divide_heads():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        ParallelConfig(tensor_parallel=4).check_model(LoopLMConfig.preset("tiny"))  # 2 KV heads


def test_fp8_and_impossible_layouts_are_errors_not_silently_ignored():
    with pytest.raises(ConfigError, match="fp8"):
        ParallelConfig(fp8="hybrid", fp8_recipe="mxfp8")  # the local FP8 linear has no MXFP8
    with pytest.raises(ConfigError, match=r"pipeline_parallel \(3\) does not divide num_hidden_layers \(2\)"):
        ParallelConfig(pipeline_parallel=3).check_model(LoopLMConfig.preset("tiny"))
    with pytest.raises(ConfigError, match="sequence_parallel"):
        ParallelConfig(sequence_parallel=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cpu_rejects_transformer_engine_with_a_clear_error_and_runs_bf16():
    # bf16 runs on CPU (slowly): the GPU precision, so its code path is tested here (test_mcore_optimizer.py).
    assert ParallelConfig(precision="bf16").transformer_config(LoopLMConfig.preset("tiny")).bf16
    with pytest.raises(ConfigError, match="transformer_engine"):
        sandwich_layer_spec("transformer_engine")
    with pytest.raises(ConfigError, match="transformer_impl"):
        ParallelConfig(transformer_impl="te")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cpu_shim_applies_only_without_cuda():
    assert cpu_shim.needed()
    assert cpu_shim.apply() is True
    assert torch.cuda.current_device() == torch.device("cpu")


def test_transformer_config_carries_the_model():
    tf = ParallelConfig().transformer_config(LoopLMConfig.preset("tiny"))
    assert (tf.num_layers, tf.hidden_size, tf.num_query_groups, tf.kv_channels) == (2, 64, 2, 16)
    assert tf.gated_linear_unit and not tf.add_bias_linear and tf.transformer_impl == "local"


def test_per_step_logits_are_not_kept_for_backward(tmp_path):
    """T full logit tensors are never alive together: the per-step head + CE is recomputed in backward."""
    (counts,) = run_ranks(saved_logit_tensors, 1, tmp_path)
    assert counts["control"] >= 1, counts  # the hook does see logits when the head is not checkpointed
    assert counts["checkpointed"] == 0, counts


def test_pipeline_config_errors_name_the_fields():
    from looplm.infra.configs import load_config
    from looplm.pipelines.training.config import PretrainConfig

    tiny = Path(__file__).resolve().parents[3] / "configs" / "train-tiny-cpu.yaml"
    small = ["parallel.pipeline_parallel=2", "data.micro_batch_size=4"]
    with pytest.raises(ValueError, match="needs at least 2 micro-batches per step on each DP rank"):
        load_config(PretrainConfig, tiny, [*small, "data.global_batch_size=4"])
    with pytest.raises(ValueError, match="runs the Stage I objective only"):
        load_config(PretrainConfig, tiny, [*small, "data.global_batch_size=8", "train.objective=stage2"])
    assert load_config(PretrainConfig, tiny, [*small, "data.global_batch_size=8"]).world_size == 2
