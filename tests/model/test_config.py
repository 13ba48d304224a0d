import dataclasses

import pytest
import torch

from looplm.model import ConfigError, LoopLM, LoopLMConfig


@pytest.mark.parametrize(("name", "expected"), [("ouro-1.4b", 1_434_652_673), ("ouro-2.6b", 2_667_974_657)])
def test_ouro_preset_parameter_counts_are_exact(name, expected):
    config = LoopLMConfig.preset(name)
    assert config.num_parameters() == expected
    # Count the real module too, built without memory on the meta device.
    with torch.device("meta"):
        model = LoopLM(config)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_ouro_preset_numbers():
    config = LoopLMConfig.preset("ouro-1.4b")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (24, 2048, 16)
    assert (config.num_key_value_heads, config.attention_head_dim, config.intermediate_size) == (16, 128, 5632)
    assert (config.vocab_size, config.rope_theta, config.rms_norm_eps) == (49152, 1e6, 1e-6)
    assert (config.tie_word_embeddings, config.total_ut_steps, config.max_position_embeddings) == (False, 4, 65536)
    assert LoopLMConfig.preset("ouro-2.6b").num_hidden_layers == 48


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_cpu_presets_count_matches_module(name):
    config = LoopLMConfig.preset(name)
    assert sum(p.numel() for p in LoopLM(config).parameters()) == config.num_parameters()


def test_tied_embeddings_count_once():
    config = LoopLMConfig.preset("tiny", tie_word_embeddings=True)
    model = LoopLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 100, "num_attention_heads": 16}, "does not divide hidden_size"),
        ({"total_ut_steps": 0}, "total_ut_steps"),
        ({"num_key_value_heads": 3}, "does not divide num_attention_heads"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"head_dim": 7}, "head_dim"),
        ({"early_exit_threshold": 1.5}, "early_exit_threshold"),
        ({"pad_token_id": 5000}, "pad_token_id"),
    ],
)
def test_bad_configs_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        LoopLMConfig.preset("tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        LoopLMConfig.preset("huge")


def test_hf_dict_round_trip_and_defaults():
    config = LoopLMConfig.preset("small", tie_word_embeddings=True, total_ut_steps=6)
    data = config.to_hf_dict()
    assert data["model_type"] == "ouro" and data["architectures"] == ["OuroForCausalLM"]
    assert LoopLMConfig.from_hf_dict(data) == config
    # head_dim and num_key_value_heads may be absent from a config.json.
    minimal = {k: data[k] for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")}
    minimal["num_attention_heads"] = data["num_attention_heads"]
    restored = LoopLMConfig.from_hf_dict(minimal)
    assert restored.attention_head_dim == config.hidden_size // config.num_attention_heads
    assert restored.num_key_value_heads == restored.num_attention_heads
    with pytest.raises(ConfigError, match="model_type"):
        LoopLMConfig.from_hf_dict({**data, "model_type": "llama"})


def test_flops_are_loop_aware():
    config = LoopLMConfig.preset("ouro-1.4b")
    one, four = config.flops_per_token(4096, num_steps=1), config.flops_per_token(4096, num_steps=4)
    head = 2 * (config.hidden_size * config.vocab_size + config.hidden_size)
    # The stack scales with T; in training the LM head runs at every step too.
    assert four["forward"] == pytest.approx(4 * one["forward"])
    assert four["backward"] == 2 * four["forward"] and four["total"] == 3 * four["forward"]
    inference = config.flops_per_token(4096, num_steps=4, lm_head_steps=1)
    assert four["forward"] - inference["forward"] == pytest.approx(3 * head)
    # Dense-transformer sanity check: forward ~ 2 * non-embedding params * T + attention + heads.
    matmul_params = config.num_hidden_layers * (config.layer_parameters - 4 * config.hidden_size)
    attention = config.num_hidden_layers * 4 * 4096 * config.hidden_size
    assert four["forward"] == pytest.approx(4 * (2 * matmul_params + attention) + 4 * head)


def test_config_is_frozen():
    config = LoopLMConfig.preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hidden_size = 3  # type: ignore[misc]
