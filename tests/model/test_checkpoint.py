"""Checkpoints in the Ouro HF layout: bit-exact round trips, sharding, and errors that name the tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from looplm.model import CheckpointError, LoopLM, LoopLMConfig
from looplm.model.tokenizer import load_tokenizer, train_byte_level_bpe

CONFIG = LoopLMConfig.preset("tiny", vocab_size=300)

OURO_NAMES = {
    "model.embed_tokens.weight",
    "model.norm.weight",
    "model.early_exit_gate.weight",
    "model.early_exit_gate.bias",
    "lm_head.weight",
} | {
    f"model.layers.{i}.{name}.weight"
    for i in range(CONFIG.num_hidden_layers)
    for name in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "input_layernorm",
        "input_layernorm_2",
        "post_attention_layernorm",
        "post_attention_layernorm_2",
    )
}


def _assert_same_weights(a: LoopLM, b: LoopLM):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def test_round_trip_is_bit_exact_with_ouro_names(tmp_path):
    model = LoopLM(CONFIG)
    model.save_pretrained(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "model.safetensors"]
    assert set(load_file(tmp_path / "ckpt" / "model.safetensors")) == OURO_NAMES
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "ouro" and config["total_ut_steps"] == 4 and config["head_dim"] == 16
    loaded = LoopLM.from_pretrained(tmp_path / "ckpt")
    _assert_same_weights(model, loaded)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 8))
    for a, b in zip(model(ids).logits, loaded(ids).logits, strict=True):
        assert torch.equal(a, b)


def test_sharded_bf16_round_trip(tmp_path):
    model = LoopLM(CONFIG).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and set(index["weight_map"]) == OURO_NAMES
    assert index["metadata"]["total_size"] == sum(p.numel() * 2 for p in model.state_dict().values())
    loaded = LoopLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    _assert_same_weights(model, loaded)
    as_fp32 = LoopLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert as_fp32.lm_head.weight.dtype == torch.float32


def test_tied_embeddings_omit_the_head(tmp_path):
    model = LoopLM(LoopLMConfig.preset("tiny", vocab_size=300, tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "ckpt")
    assert "lm_head.weight" not in load_file(tmp_path / "ckpt" / "model.safetensors")
    loaded = LoopLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    _assert_same_weights(model, loaded)


def test_tokenizer_travels_with_the_checkpoint(tmp_path):
    texts = ["the loop runs the same layers again"] * 20 + ["and learns when to stop"] * 20
    tokenizer = train_byte_level_bpe(texts, 300)
    LoopLM(CONFIG).save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    reloaded = load_tokenizer(tmp_path / "ckpt")
    assert reloaded.encode("the loop").ids == tokenizer.encode("the loop").ids
    assert reloaded.token_to_id("<|endoftext|>") == 0 and reloaded.token_to_id("<|pad|>") == 3


def _corrupt(tmp_path, edit):
    LoopLM(CONFIG).save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return tmp_path / "ckpt"


def test_missing_tensor_is_named(tmp_path):
    folder = _corrupt(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): model\.layers\.1\.mlp\.up_proj\.weight"):
        LoopLM.from_pretrained(folder)


def test_unexpected_tensor_is_named(tmp_path):
    folder = _corrupt(tmp_path, lambda t: t.update({"model.layers.9.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\): model\.layers\.9\.extra\.weight"):
        LoopLM.from_pretrained(folder)


def test_wrong_shape_is_named(tmp_path):
    folder = _corrupt(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(65,\).*\(64,\)"):
        LoopLM.from_pretrained(folder)


def test_wrong_dtype_is_named(tmp_path):
    def edit(t):
        t["model.early_exit_gate.bias"] = t["model.early_exit_gate.bias"].to(torch.float16)

    folder = _corrupt(tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"'model\.early_exit_gate\.bias' has dtype torch\.float16"):
        LoopLM.from_pretrained(folder)


def test_pickle_weights_are_never_loaded(tmp_path):
    folder = tmp_path / "ckpt"
    LoopLM(CONFIG).save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(LoopLM(CONFIG).state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        LoopLM.from_pretrained(folder)


def test_bad_config_json(tmp_path):
    folder = tmp_path / "ckpt"
    LoopLM(CONFIG).save_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        LoopLM.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="not found"):
        LoopLM.from_pretrained(tmp_path / "nowhere")


def test_save_never_leaves_a_half_written_folder(tmp_path, monkeypatch):
    model = LoopLM(CONFIG)
    model.save_pretrained(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("looplm.model.checkpoint.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        LoopLM(CONFIG).save_pretrained(tmp_path / "ckpt", overwrite=True)
    # The old checkpoint is intact and no temporary folder is left behind.
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(FileExistsError):
        model.save_pretrained(tmp_path / "ckpt")
