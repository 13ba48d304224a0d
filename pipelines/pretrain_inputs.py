"""The files a training config names, checked on the driver before Ray starts (`looplm train`).

A missing dataset or starting checkpoint would otherwise surface inside a Ray Train worker, as megatron's bare
AssertionError or safetensors' SafetensorError naming no file, after Ray has started and retried the worker group.
Each check here names the config field and the file; the errors are user errors (ConfigError, CheckpointError),
which the CLI prints as one line with exit code 2.
"""

from __future__ import annotations

from pathlib import Path

from looplm.model.checkpoint import CheckpointError, check_weights, load_config
from looplm.model.config import ConfigError

from .training.config import PretrainConfig
from .training.data import read_manifest


def _check_prefixes(field: str, prefixes: tuple[str, ...] | list[str]) -> None:
    for i, prefix in enumerate(prefixes):
        for suffix in (".bin", ".idx"):
            if not Path(f"{prefix}{suffix}").is_file():
                raise ConfigError(f"{field}[{i}]: indexed dataset file {prefix}{suffix} not found")


def check_inputs(config: PretrainConfig) -> None:
    """The training data (a curated manifest and its datasets, or indexed dataset prefixes) and the starting
    checkpoint (train.init_from_hf: config.json and readable weight files) exist; raises naming the field."""
    data = config.data
    if data.manifest is not None:
        manifest = read_manifest(data.manifest)  # names mixture.json, its fields and its tokenizer
        _check_prefixes(f"data.manifest {manifest.folder}: train blend", manifest.train[0])
        _check_prefixes(f"data.manifest {manifest.folder}: valid blend", manifest.valid[0])
    _check_prefixes("data.paths", data.paths)
    if config.train.init_from_hf:
        folder = Path(config.train.init_from_hf)
        if not folder.is_dir():
            raise CheckpointError(f"train.init_from_hf: {folder} is not a checkpoint folder (not found)")
        try:
            load_config(folder)
            check_weights(folder)
        except CheckpointError as err:
            raise CheckpointError(f"train.init_from_hf: {err}") from None
