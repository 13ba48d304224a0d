"""Checkpoints in the layout of the released Ouro models, so a downloaded Ouro folder loads unchanged.

A folder holds `config.json` (model_type "ouro"), the weights as safetensors (one `model.safetensors`, or
`model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json` above a size threshold) and,
when given, the tokenizer as `tokenizer.json`. Tensor names are the model's `state_dict()` keys, which are the
Ouro names (`model.layers.{i}.self_attn.q_proj.weight`, ...). With tied embeddings `lm_head.weight` is absent.

Loading reads safetensors only: nothing is ever unpickled. Every tensor is checked against the config before
any is used: a missing, unexpected, misshapen or wrongly typed tensor is an error that names it. Saving writes
into a temporary sibling folder and renames it into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import staged_folder
from .config import LoopLMConfig
from .looplm import LoopLM

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


class CheckpointError(ValueError):
    """A checkpoint folder that does not hold a loadable LoopLM; the message names what is wrong."""


def _state_to_save(model: LoopLM) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_pretrained(
    model: LoopLM,
    directory: str | Path,
    *,
    tokenizer=None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write config.json, safetensors (sharded above max_shard_bytes) and tokenizer.json when given."""
    target = Path(directory)
    with staged_folder(target, overwrite=overwrite) as staging:
        state = _state_to_save(model)
        dtypes = {t.dtype for t in state.values()}
        if len(dtypes) != 1:
            raise CheckpointError(f"model mixes dtypes {sorted(map(str, dtypes))}; cast it to one first")
        dtype = dtypes.pop()
        config = {**model.config.to_hf_dict(), "torch_dtype": _DTYPE_NAMES[dtype]}
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        shards = _shards(state, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], staging / SINGLE_FILE, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, staging / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(str(staging / "tokenizer.json"))
    return target


def read_config_json(directory: str | Path) -> dict:
    """A checkpoint folder's config.json as written, every key kept (errors name the file and what is wrong)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} not found: not a checkpoint folder")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def load_config(directory: str | Path) -> LoopLMConfig:
    return LoopLMConfig.from_hf_dict(read_config_json(directory))


def _skeleton_and_shapes(config: LoopLMConfig) -> tuple[LoopLM, dict[str, tuple[int, ...]]]:
    """A meta-device LoopLM of `config`, and the name and shape of every tensor its checkpoint must hold."""
    with torch.device("meta"):
        skeleton = LoopLM(config)
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    return skeleton, expected


def _check_names(directory: Path, expected: dict[str, tuple[int, ...]], found: Iterable[str]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise CheckpointError(f"checkpoint {directory} is missing tensor(s): {', '.join(missing)}")
    if unexpected:
        raise CheckpointError(f"checkpoint {directory} has unexpected tensor(s): {', '.join(unexpected)}")


def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif (directory / SINGLE_FILE).is_file():
        files = [directory / SINGLE_FILE]
    else:
        raise CheckpointError(f"{directory} holds neither {SINGLE_FILE} nor {INDEX_NAME}")
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"weight file {file} listed in {INDEX_NAME} is missing")
    return files


@contextmanager
def open_weights(file: Path) -> Iterator:
    """`safe_open` of one weight file; a file it cannot read (cut short by a failed copy, not safetensors) is a
    CheckpointError that names the file, which safetensors' own error does not."""
    try:
        reader = safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as err:
        raise CheckpointError(f"weight file {file} is not readable safetensors (truncated or corrupt): {err}") from None
    with reader:
        yield reader


def check_weights(directory: str | Path) -> list[Path]:
    """The folder's weight files, each with a readable safetensors header (which also covers the file's size):
    what can be checked without loading a tensor."""
    files = _weight_files(Path(directory))
    for file in files:
        with open_weights(file):
            pass
    return files


REGISTRY_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def checkpoint_folder(location: str | Path) -> Path:
    """A folder path; a registry URI is an error that says where it is resolved (looplm.model reads folders)."""
    if isinstance(location, str) and location.startswith(REGISTRY_SCHEMES):
        raise CheckpointError(
            f"{location!r} is a registry URI and looplm.model reads folders: download it first with "
            "looplm.infra.registry.resolve_model_dir(uri)"
        )
    return Path(location)


def load_pretrained(
    directory: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> LoopLM:
    """Load a checkpoint folder; dtype None keeps the checkpoint's own dtype. A registered model is downloaded to
    a folder first: `load_pretrained(looplm.infra.registry.resolve_model_dir("models:/NAME/VERSION"))`."""
    directory = checkpoint_folder(directory)
    config = load_config(directory)
    skeleton, expected = _skeleton_and_shapes(config)

    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(directory):
        with open_weights(file) as reader:
            for name in reader.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name in tensors:
                    raise CheckpointError(f"tensor {name!r} appears in more than one weight file")
                tensors[name] = reader.get_tensor(name)
    _check_names(directory, expected, tensors)
    file_dtype = _declared_dtype(directory, config, tensors)
    for name, tensor in tensors.items():
        if tensor.shape != expected[name]:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, the config expects {tuple(expected[name])}"
            )
        if tensor.dtype != file_dtype:
            raise CheckpointError(f"tensor {name!r} has dtype {tensor.dtype}, the checkpoint is {file_dtype}")

    target_dtype = dtype or file_dtype
    state = {name: t.to(device=device, dtype=target_dtype) for name, t in tensors.items()}
    model = skeleton
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _declared_dtype(directory: Path, config: LoopLMConfig, tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The checkpoint's dtype: config.json's torch_dtype, else that of its embedding."""
    declared = json.loads((directory / CONFIG_NAME).read_text()).get("torch_dtype")
    if declared is None:
        return tensors["model.embed_tokens.weight"].dtype
    if declared not in _DTYPES:
        raise CheckpointError(f"config.json torch_dtype {declared!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[declared]
