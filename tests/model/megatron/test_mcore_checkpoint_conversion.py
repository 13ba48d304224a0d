"""Ouro HF <-> Megatron conversion is exact, and dist_checkpointing reshards between TP=1 and TP=2."""

from __future__ import annotations

import pytest
import torch
from _mcore_spawn import run_ranks
from _mcore_workers import resharding

from looplm.model import LoopLM, LoopLMConfig
from looplm.model.megatron.convert import hf_to_megatron, megatron_to_hf, shard, unshard


@pytest.mark.parametrize("preset_overrides", [{}, {"num_key_value_heads": 4}, {"num_key_value_heads": 1}])
def test_hf_megatron_round_trip_is_exact_at_any_tp(preset_overrides):
    config = LoopLMConfig.preset("tiny", **preset_overrides)
    state = LoopLM(config).state_dict()
    full = hf_to_megatron(state, config)
    for tp in (1, 2, 4):
        if config.num_key_value_heads % tp:
            continue
        shards = [shard(full, tp, rank) for rank in range(tp)]
        back = megatron_to_hf(unshard(shards), config)
        assert back.keys() == state.keys()
        assert all(torch.equal(back[name], state[name]) for name in state)


def test_qkv_layout_is_grouped_per_kv_head():
    config = LoopLMConfig.preset("tiny")  # 4 query heads, 2 KV heads, head_dim 16
    state = LoopLM(config).state_dict()
    qkv = hf_to_megatron(state, config)["decoder.layers.0.self_attention.linear_qkv.weight"]
    q, k = state["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.k_proj.weight"]
    # Group 1 starts after group 0's two query heads, key and value: rows 64..; its query heads are q heads 2-3.
    assert torch.equal(qkv[64:96], q[32:64])
    assert torch.equal(qkv[96:112], k[16:32])


def test_conversion_rejects_a_state_that_does_not_fit():
    config = LoopLMConfig.preset("tiny")
    state = LoopLM(config).state_dict()
    state.pop("model.norm.weight")
    with pytest.raises(KeyError, match="model.norm.weight"):
        hf_to_megatron(state, config)


@pytest.mark.slow
def test_dist_checkpoint_reshards_between_tp1_and_tp2_and_hf_round_trip(tmp_path):
    results = run_ranks(resharding, 2, tmp_path, root=str(tmp_path / "ckpt"))
    for out in results:
        assert not out["tp2_before_load_equal"]
        assert out["tp1_to_tp2_exact"] and out["tp2_to_tp1_exact"] and out["hf_to_tp2_exact"]
        assert out["tp2_loss"] == pytest.approx(out["ref_loss"], rel=1e-6)
        assert out["tp1_loss"] == pytest.approx(out["ref_loss"], rel=1e-6)
    assert results[0]["hf_file_exact"]
