"""The files a training config names, checked on the driver before Ray starts (`looplm train`).

A missing dataset or starting checkpoint would otherwise surface inside a Ray Train worker, as megatron's bare
AssertionError or safetensors' SafetensorError naming no file, after Ray has started and retried the worker group.
Each check here names the config field and the file; the errors are user errors (ConfigError, CheckpointError),
which the CLI prints as one line with exit code 2.
"""

from __future__ import annotations

from pathlib import Path

from looplm.model.checkpoint import CheckpointError, check_weights, load_config
from looplm.model.config import ConfigError, LoopLMConfig

from .training.config import PretrainConfig
from .training.data import read_manifest

# The LoopLMConfig fields that fix the shape of a tensor: a starting checkpoint must agree with the model on each.
SHAPES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)


def _shape(config: LoopLMConfig, name: str) -> object:
    if name == "head_dim":  # None means hidden_size // num_attention_heads
        return config.head_dim or config.hidden_size // config.num_attention_heads
    return getattr(config, name)


def _check_prefixes(field: str, prefixes: tuple[str, ...] | list[str]) -> None:
    for i, prefix in enumerate(prefixes):
        for suffix in (".bin", ".idx"):
            if not Path(f"{prefix}{suffix}").is_file():
                raise ConfigError(f"{field}[{i}]: indexed dataset file {prefix}{suffix} not found")


def check_inputs(config: PretrainConfig, *, data: bool = True, init: bool = True) -> None:
    """The training data (a curated manifest and its datasets, or indexed dataset prefixes) and the starting
    checkpoint (train.init_from_hf: config.json and readable weight files, of the model's shapes) exist; raises
    naming the field. data/init False leave one out (in an experiment, a field an upstream step fills)."""
    if data:
        _check_data(config)
    if init and config.train.init_from_hf:
        _check_init(config)


def _check_data(config: PretrainConfig) -> None:
    data = config.data
    if data.manifest is not None:
        manifest = read_manifest(data.manifest)  # names mixture.json, its fields and its tokenizer
        _check_prefixes(f"data.manifest {manifest.folder}: train blend", manifest.train[0])
        _check_prefixes(f"data.manifest {manifest.folder}: valid blend", manifest.valid[0])
    _check_prefixes("data.paths", data.paths)


def _check_init(config: PretrainConfig) -> None:
    folder = Path(config.train.init_from_hf)
    if not folder.is_dir():
        raise CheckpointError(f"train.init_from_hf: {folder} is not a checkpoint folder (not found)")
    try:
        init = load_config(folder)
        check_weights(folder)
    except CheckpointError as err:
        raise CheckpointError(f"train.init_from_hf: {err}") from None
    model = config.model.build()
    differ = [
        f"{name} {_shape(init, name)} != {_shape(model, name)}"
        for name in SHAPES
        if _shape(init, name) != _shape(model, name)
    ]
    if differ:
        raise ConfigError(
            f"train.init_from_hf: {folder / 'config.json'} does not fit model {config.model.preset!r} "
            f"(checkpoint != model: {', '.join(differ)}); set model.preset or model.overrides to match it"
        )
