"""Layer upcycling (Ouro 1.4B -> 2.6B): exact tensor copies in the chosen order, what the upcycled model computes
(and that it is not the source's N x T loops), Megatron conversion, named errors, atomic writes and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from looplm.model import CheckpointError, ConfigError, LoopLM, LoopLMConfig, load_pretrained
from looplm.model.looplm import rope_cos_sin
from looplm.model.megatron.convert import hf_to_megatron, megatron_to_hf, shard, unshard
from looplm.model.upcycle import layer_map, upcycle_layers
from looplm.platform.cli import main

N = 3
CONFIG = LoopLMConfig.preset("tiny", vocab_size=300, num_hidden_layers=N)
LAYER_TENSORS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "input_layernorm_2.weight",
    "post_attention_layernorm.weight",
    "post_attention_layernorm_2.weight",
)
TOP_TENSORS = (
    "model.embed_tokens.weight",
    "model.norm.weight",
    "model.early_exit_gate.weight",
    "model.early_exit_gate.bias",
    "lm_head.weight",
)


def _source_model(config: LoopLMConfig = CONFIG, dtype: torch.dtype = torch.float32) -> LoopLM:
    """A model whose every tensor differs from layer to layer (norm gains and gate bias too, not ones and zero)."""
    model = LoopLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    return model.to(dtype).eval()


def _save_source(tmp_path: Path, dtype: torch.dtype = torch.float32, **save_kwargs) -> tuple[LoopLM, Path]:
    model = _source_model(dtype=dtype)
    return model, model.save_pretrained(tmp_path / "src", **save_kwargs)


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read straight from its safetensors files (not through the loader)."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as reader:
            for name in reader.keys():  # noqa: SIM118
                assert name not in tensors
                tensors[name] = reader.get_tensor(name)
    return tensors


def _expected_source_layer(j: int, order: str, factor: int) -> int:
    return j % N if order == "stacked" else j // factor


def test_layer_map_orders():
    assert layer_map(3, 2, "stacked") == [0, 1, 2, 0, 1, 2]
    assert layer_map(3, 2, "interleaved") == [0, 0, 1, 1, 2, 2]
    assert layer_map(2, 3, "stacked") == [0, 1, 0, 1, 0, 1]
    assert layer_map(2, 3, "interleaved") == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    ("order", "factor", "dtype", "source_shard_bytes"),
    [
        ("stacked", 2, torch.float32, None),
        ("interleaved", 2, torch.float32, None),
        ("stacked", 3, torch.bfloat16, 40_000),  # a sharded bf16 source
        ("interleaved", 2, torch.bfloat16, 40_000),
    ],
)
def test_upcycled_tensors_are_exact_copies_in_order(tmp_path, order, factor, dtype, source_shard_bytes):
    kwargs = {} if source_shard_bytes is None else {"max_shard_bytes": source_shard_bytes}
    _, src = _save_source(tmp_path, dtype, **kwargs)
    if source_shard_bytes is not None:
        assert (src / "model.safetensors.index.json").is_file()
    dst = upcycle_layers(src, tmp_path / "dst", factor=factor, order=order)
    assert dst == tmp_path / "dst"

    source, out = _read_tensors(src), _read_tensors(dst)
    layer_names = {f"model.layers.{j}.{t}" for j in range(factor * N) for t in LAYER_TENSORS}
    assert set(out) == layer_names | set(TOP_TENSORS)
    for j in range(factor * N):
        i = _expected_source_layer(j, order, factor)
        for t in LAYER_TENSORS:
            a, b = out[f"model.layers.{j}.{t}"], source[f"model.layers.{i}.{t}"]
            assert a.dtype == dtype and torch.equal(a, b), (j, i, t)
    for name in TOP_TENSORS:
        assert out[name].dtype == dtype and torch.equal(out[name], source[name]), name

    src_config = json.loads((src / "config.json").read_text())
    dst_config = json.loads((dst / "config.json").read_text())
    assert dst_config["num_hidden_layers"] == factor * src_config["num_hidden_layers"]
    assert {k: v for k, v in dst_config.items() if k != "num_hidden_layers"} == {
        k: v for k, v in src_config.items() if k != "num_hidden_layers"
    }
    assert dst_config["torch_dtype"] == {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    # The loader accepts it as a checkpoint of the bigger model.
    loaded = load_pretrained(dst)
    assert loaded.config.num_hidden_layers == factor * N and loaded.lm_head.weight.dtype == dtype
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no staging folder left behind


def test_each_tensor_keeps_its_own_dtype(tmp_path):
    """A source mixing dtypes (written by hand: save_pretrained casts to one) comes out with the same mix."""
    state = {name: t.to(torch.bfloat16) for name, t in _source_model().state_dict().items()}
    state["model.early_exit_gate.bias"] = state["model.early_exit_gate.bias"].to(torch.float32)
    state["model.layers.1.input_layernorm.weight"] = state["model.layers.1.input_layernorm.weight"].half()
    src = tmp_path / "src"
    src.mkdir()
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(CONFIG.to_hf_dict()))
    out = _read_tensors(upcycle_layers(src, tmp_path / "dst"))
    assert out["model.early_exit_gate.bias"].dtype == torch.float32
    for j in (1, 1 + N):
        assert torch.equal(
            out[f"model.layers.{j}.input_layernorm.weight"], state["model.layers.1.input_layernorm.weight"]
        )
        assert out[f"model.layers.{j}.input_layernorm.weight"].dtype == torch.float16
    assert out["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16
    assert all(torch.equal(out[name], state[name]) for name in TOP_TENSORS)


def test_sharded_output_matches_single_file_output(tmp_path):
    _, src = _save_source(tmp_path)
    single = upcycle_layers(src, tmp_path / "single")
    sharded = upcycle_layers(src, tmp_path / "sharded", max_shard_bytes=30_000)
    assert sorted(p.name for p in single.iterdir()) == ["config.json", "model.safetensors"]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and files == {p.name for p in sharded.glob("*.safetensors")}
    a, b = _read_tensors(single), _read_tensors(sharded)
    assert a.keys() == b.keys() == index["weight_map"].keys()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())


def _by_hand(
    model: LoopLM, ids: torch.Tensor, steps: int, order: list[int], norm_after: set[int] | None = None
) -> list[torch.Tensor]:
    """Per-step logits computed from `model`'s own modules: embed once; per step run model's layers in `order`,
    applying the final norm after each position in `norm_after` (default: only after the last) and at the end."""
    norm_after = norm_after or set()
    batch, seq = ids.shape
    config = model.config
    positions = torch.arange(seq).expand(batch, seq)
    cos, sin = rope_cos_sin(positions, config.attention_head_dim, config.rope_theta, torch.float32)
    h = model.model.embed_tokens(ids)
    logits = []
    for _ in range(steps):
        for position, i in enumerate(order):
            h, _ = model.model.layers[i](h, cos, sin, None)
            if position in norm_after:
                h = model.model.norm(h)
        h = model.model.norm(h)
        logits.append(model.lm_head(h))
    return logits


@pytest.mark.parametrize("order", ["stacked", "interleaved"])
@torch.no_grad()
def test_upcycled_model_runs_the_source_layers_in_the_duplicated_order(tmp_path, order):
    source, src = _save_source(tmp_path)
    upcycled = load_pretrained(upcycle_layers(src, tmp_path / "dst", order=order))
    ids = torch.randint(0, CONFIG.vocab_size, (2, 12))
    steps = 3
    got = upcycled(ids, num_steps=steps).logits
    duplicated = [0, 1, 2, 0, 1, 2] if order == "stacked" else [0, 0, 1, 1, 2, 2]
    want = _by_hand(source, ids, steps, duplicated)
    assert len(got) == len(want) == steps
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@torch.no_grad()
def test_stacked_upcycling_is_not_the_source_run_twice_as_long(tmp_path):
    """2N layers x T/2 loops differ from N x T loops: the final norm between the two copies is missing."""
    source, src = _save_source(tmp_path)
    upcycled = load_pretrained(upcycle_layers(src, tmp_path / "dst", order="stacked"))
    ids = torch.randint(0, CONFIG.vocab_size, (2, 12))
    long_source = source(ids, num_steps=4).logits  # N layers x 4 loops
    short_upcycled = upcycled(ids, num_steps=2).logits  # 2N layers x 2 loops
    for k in range(2):
        assert (short_upcycled[k] - long_source[2 * k + 1]).abs().max() > 1e-2
    # With the final norm put back between the two copies, the upcycled model's own modules give exactly the
    # source's loops 2 and 4: the missing norm is the only difference.
    with_norm = _by_hand(upcycled, ids, 2, list(range(2 * N)), norm_after={N - 1})
    for k in range(2):
        torch.testing.assert_close(with_norm[k], long_source[2 * k + 1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("order", ["stacked", "interleaved"])
def test_upcycled_folder_converts_to_megatron_layers(tmp_path, order):
    """What import_hf does on the upcycled folder (load, HF -> Megatron, TP shard) is exact, and each Megatron
    layer is the source's Megatron layer in the duplicated order."""
    source, src = _save_source(tmp_path)
    dst = upcycle_layers(src, tmp_path / "dst", order=order)
    reference = load_pretrained(dst)
    hf_state = {k: v.float() for k, v in reference.state_dict().items()}
    full = hf_to_megatron(hf_state, reference.config)
    assert {int(name.split(".")[2]) for name in full if name.startswith("decoder.layers.")} == set(range(2 * N))
    source_full = hf_to_megatron(source.state_dict(), source.config)
    for name, tensor in full.items():
        if name.startswith("decoder.layers."):
            j = int(name.split(".")[2])
            i = _expected_source_layer(j, order, 2)
            assert torch.equal(tensor, source_full[name.replace(f"layers.{j}.", f"layers.{i}.", 1)]), name
        else:
            assert torch.equal(tensor, source_full[name]), name
    for tp in (1, 2):
        back = megatron_to_hf(unshard([shard(full, tp, rank) for rank in range(tp)]), reference.config)
        assert back.keys() == hf_state.keys()
        assert all(torch.equal(back[name], hf_state[name]) for name in hf_state)


def test_companions_are_copied_and_per_layer_config_lists_follow_their_layers(tmp_path):
    _, src = _save_source(tmp_path)
    (src / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    config = json.loads((src / "config.json").read_text())
    config["layer_types"] = ["a", "b", "c"]
    (src / "config.json").write_text(json.dumps(config))
    dst = upcycle_layers(src, tmp_path / "dst", order="stacked")
    assert (dst / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    assert json.loads((dst / "config.json").read_text())["layer_types"] == ["a", "b", "c", "a", "b", "c"]
    dst2 = upcycle_layers(src, tmp_path / "dst2", order="interleaved")
    assert json.loads((dst2 / "config.json").read_text())["layer_types"] == ["a", "a", "b", "b", "c", "c"]


def test_a_registry_uri_is_refused_with_where_to_resolve_it(tmp_path):
    # looplm.model reads folders; `looplm upcycle` downloads a registered model through looplm.infra.registry.
    with pytest.raises(CheckpointError, match="registry URI and looplm.model reads folders"):
        upcycle_layers("models:/looplm-tiny/1", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_bad_inputs_are_named(tmp_path):
    _, src = _save_source(tmp_path)
    with pytest.raises(CheckpointError, match="nowhere.*not found"):
        upcycle_layers(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(ConfigError, match="factor must be an integer of at least 2, got 1"):
        upcycle_layers(src, tmp_path / "out", factor=1)
    with pytest.raises(ConfigError, match="order 'random'"):
        upcycle_layers(src, tmp_path / "out", order="random")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="full exists and is not empty"):
        upcycle_layers(src, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        upcycle_layers(llama, tmp_path / "out")
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    with pytest.raises(CheckpointError, match="config.json not found"):
        upcycle_layers(no_config, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    # A source whose tensors disagree with its config is named, tensor by tensor.
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_hidden_layers": N + 1}))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): model\.layers\.3\."):
        upcycle_layers(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    with pytest.raises(
        CheckpointError, match=r"'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape .* the config expects"
    ):
        upcycle_layers(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_empty_destination_folder_is_used(tmp_path):
    _, src = _save_source(tmp_path)
    (tmp_path / "empty").mkdir()
    upcycle_layers(src, tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_a_crash_leaves_no_output_and_no_staging_folder(tmp_path, monkeypatch):
    import looplm.model.upcycle as upcycle

    _, src = _save_source(tmp_path)
    written = []
    real_write = upcycle._write_safetensors

    def write_then_crash(path, plan, progress=None):
        real_write(path, plan, progress)
        written.append(path)
        raise OSError("disk full")

    monkeypatch.setattr(upcycle, "_write_safetensors", write_then_crash)
    with pytest.raises(OSError, match="disk full"):
        upcycle_layers(src, tmp_path / "dst", max_shard_bytes=30_000)
    assert written  # a shard was fully written before the crash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_progress_reaches_the_total(tmp_path):
    _, src = _save_source(tmp_path)
    seen = []
    dst = upcycle_layers(src, tmp_path / "dst", progress=lambda done, total: seen.append((done, total)))
    size = (dst / "model.safetensors").stat().st_size
    done, total = seen[-1]
    assert done == total and 0 < total < size  # the file also holds the header
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_cli_upcycles_a_folder(tmp_path, capsys):
    _, src = _save_source(tmp_path)
    assert main(["upcycle", str(src), str(tmp_path / "dst"), "--factor", "3", "--order", "interleaved"]) == 0
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 * N
    out, src_tensors = _read_tensors(tmp_path / "dst"), _read_tensors(src)
    assert torch.equal(out["model.layers.5.mlp.up_proj.weight"], src_tensors["model.layers.1.mlp.up_proj.weight"])
    assert "9 layers (interleaved, x3)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["upcycle", str(src), str(tmp_path / "dst2"), "--order", "random"])
