"""Layer upcycling: an Ouro checkpoint with its N layers duplicated to factor x N (Ouro 1.4B -> 2.6B, §1.5).

    upcycle_layers("runs/train-ouro-1.4b-stage1a/hf", "runs/ouro-48l/hf", factor=2, order="stacked")

The 2.6B Ouro model starts Stage 1b from the 24-layer Stage 1a model with its layers duplicated to 48 (ouro-spec.md
§1.5, "layer duplication"). The paper does not say in which order, nor whether noise or rescaling is added, so:
- `order="stacked"` (the default): new layer j is source layer j mod N, i.e. [1..N, 1..N, ...];
  `order="interleaved"`: new layer j is source layer j // factor, i.e. [1, 1, 2, 2, ...].
- Every tensor is copied bit for bit, in its own dtype: no noise, no rescaling. Every non-layer tensor (embedding,
  final norm, exit gate, LM head) is copied unchanged.
- config.json is the source's with `num_hidden_layers` multiplied by the factor and nothing else changed: in
  particular `total_ut_steps` stays (the training config sets T), and so do keys looplm does not read (auto_map,
  torch_dtype, ...). The one exception is a per-layer list (`layer_types`, which newer Qwen2-style configs carry),
  which would otherwise disagree with the layer count: its entries follow their layers in the same order.
- tokenizer.json, and the tokenizer, generation and remote-code companions of a released Ouro folder, are copied
  when present (COMPANION_FILES); a model card is not (it describes the source model).

What upcycling preserves, exactly. In Ouro the shared final norm `model.norm` is applied after every pass through
the stack, and its output feeds the next pass (ouro-spec.md §1.3). So stacked duplication, 2N layers x T/2 loops,
is NOT exactly the source's N layers x T loops: the upcycled model runs layers 1..N twice in a row WITHOUT the final
norm between the two copies, where the source applied it between its two passes. (This corrects the "[derived]"
note of ouro-spec.md §1.5, which claims 48 layers x 4 loops compute exactly what 24 layers x 8 loops did.) The
upcycled model is therefore a close starting point, not a function-preserving one, for either order; what it
computes exactly is the source's own layers in the duplicated order with the final norm after every 2N layers
(tests/model/test_upcycle.py checks both statements).

The source is a local folder (`looplm upcycle` downloads a registered `models:/NAME/VERSION` first, through
looplm.infra.registry), single-file or sharded. Nothing is ever held whole: tensors are read one at a time with
safetensors' `safe_open` and streamed into the output files, so the peak memory is one tensor (the 2.6B model in
fp32 is ~10 GB).
The output follows save_pretrained's layout (one `model.safetensors`, or shards of at most `max_shard_bytes` plus
`model.safetensors.index.json`) and is written into a temporary sibling folder renamed into place at the end, so
a crash never leaves a half-written output.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from .atomic import check_free_folder, staged_folder
from .checkpoint import (
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_NAME,
    SINGLE_FILE,
    CheckpointError,
    _check_names,
    _shards,
    _skeleton_and_shapes,
    _weight_files,
    checkpoint_folder,
    open_weights,
    read_config_json,
)
from .config import ConfigError, LoopLMConfig

ORDERS = ("stacked", "interleaved")
COMPANION_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
    "configuration_ouro.py",
    "modeling_ouro.py",
)
PER_LAYER_CONFIG_KEYS = ("layer_types",)
_LAYER_PREFIX = "model.layers."

# safetensors dtype names -> torch dtypes (the header names the dtype; sizes are planned before anything is read).
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def layer_map(num_layers: int, factor: int = 2, order: str = "stacked") -> list[int]:
    """For each layer j of the upcycled model (0-indexed), the source layer it copies."""
    _check_arguments(factor, order)
    if order == "stacked":
        return [j % num_layers for j in range(factor * num_layers)]
    return [j // factor for j in range(factor * num_layers)]


def _check_arguments(factor: int, order: str) -> None:
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 2:
        raise ConfigError(f"upcycling factor must be an integer of at least 2, got {factor!r}")
    if order not in ORDERS:
        raise ConfigError(f"upcycling order {order!r} is not one of {', '.join(ORDERS)}")


def upcycled_config(data: dict[str, Any], factor: int = 2, order: str = "stacked") -> dict[str, Any]:
    """The upcycled config.json: num_hidden_layers x factor, per-layer lists reordered, everything else as is."""
    num_layers = LoopLMConfig.from_hf_dict(data).num_hidden_layers
    mapping = layer_map(num_layers, factor, order)
    out = {**data, "num_hidden_layers": factor * num_layers}
    for key in PER_LAYER_CONFIG_KEYS:
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or len(value) != num_layers:
            raise ConfigError(f"config.json {key!r} should list one entry per layer ({num_layers}), got {value!r}")
        out[key] = [value[i] for i in mapping]
    return out


def _split_layer_name(name: str) -> tuple[int, str] | None:
    """`model.layers.3.mlp.up_proj.weight` -> (3, "mlp.up_proj.weight"); None for a non-layer tensor."""
    if not name.startswith(_LAYER_PREFIX):
        return None
    index, _, rest = name[len(_LAYER_PREFIX) :].partition(".")
    return int(index), rest


def _source_tensors(directory: Path, config: LoopLMConfig, stack: ExitStack) -> dict[str, Any]:
    """Each source tensor's name -> an open safe_open reader holding it, checked against the config."""
    readers: dict[str, Any] = {}
    for file in _weight_files(directory):
        reader = stack.enter_context(open_weights(file))
        for name in reader.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if name in readers:
                raise CheckpointError(f"tensor {name!r} appears in more than one weight file")
            readers[name] = reader
    _, expected = _skeleton_and_shapes(config)
    _check_names(directory, expected, readers)
    for name, reader in readers.items():
        view = reader.get_slice(name)
        if tuple(view.get_shape()) != expected[name]:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(view.get_shape())}, the config expects {expected[name]}"
            )
        if view.get_dtype() not in _ST_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {view.get_dtype()}, which looplm does not read")
    # Ordered as the model's state_dict: embedding, layer 0, layer 1, ..., final norm, gate, head.
    return {name: readers[name] for name in expected}


def _plan(
    readers: dict[str, Any], config: LoopLMConfig, factor: int, order: str
) -> dict[str, tuple[str, Any, torch.Tensor]]:
    """Each output tensor's name -> (its source tensor's name, that tensor's reader, a meta tensor of its size)."""
    mapping = layer_map(config.num_hidden_layers, factor, order)
    layers: dict[int, list[str]] = {}  # source layer -> its tensors' names within the layer
    top: list[str] = []
    for name in readers:
        split = _split_layer_name(name)
        if split is None:
            top.append(name)
        else:
            layers.setdefault(split[0], []).append(split[1])
    pairs = [
        (f"{_LAYER_PREFIX}{j}.{rest}", f"{_LAYER_PREFIX}{i}.{rest}")
        for j, i in enumerate(mapping)
        for rest in layers[i]
    ]
    embedding = "model.embed_tokens.weight"
    pairs = [(embedding, embedding), *pairs, *((name, name) for name in top if name != embedding)]
    plan: dict[str, tuple[str, Any, torch.Tensor]] = {}
    for out_name, src_name in pairs:
        view = readers[src_name].get_slice(src_name)
        meta = torch.empty(view.get_shape(), dtype=_ST_DTYPES[view.get_dtype()], device="meta")
        plan[out_name] = (src_name, readers[src_name], meta)
    return plan


def _nbytes(meta: torch.Tensor) -> int:
    return meta.numel() * meta.element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in _ST_DTYPES.items() if value == dtype)


def _write_safetensors(
    path: Path,
    plan: dict[str, tuple[str, Any, torch.Tensor]],
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write one safetensors file tensor by tensor: the header from the planned sizes, then each tensor's bytes.

    The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header
    (padded with spaces to a multiple of 8) naming each tensor's dtype, shape and [begin, end) byte offsets, then
    the tensors' bytes back to back. Larger dtypes come first, as safetensors orders them, so every tensor stays
    aligned to its element size.
    """
    names = sorted(plan, key=lambda name: -plan[name][2].element_size())  # stable: keeps the planned order
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        meta = plan[name][2]
        header[name] = {
            "dtype": _dtype_name(meta.dtype),
            "shape": list(meta.shape),
            "data_offsets": [offset, offset + _nbytes(meta)],
        }
        offset += _nbytes(meta)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name in names:
            src_name, reader, meta = plan[name]
            tensor = reader.get_tensor(src_name)
            if tensor.dtype != meta.dtype or tensor.shape != meta.shape:
                raise CheckpointError(f"tensor {src_name!r} does not match its own header")
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            out.write(data)
            del tensor, data
            if progress is not None:
                progress(_nbytes(meta))


UPCYCLE_TARGET = "upcycling writes a new checkpoint folder"


def upcycle_layers(
    src: str | Path,
    dst: str | Path,
    factor: int = 2,
    order: str = "stacked",
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `dst`: the checkpoint at `src` with its N layers duplicated to factor x N (see the module docstring).

    `src` is a checkpoint folder or a registered model URI; `dst` must not exist or be an empty folder.
    `progress(done_bytes, total_bytes)` is called after each tensor is written. Returns `dst`.
    """
    _check_arguments(factor, order)
    target = Path(dst)
    check_free_folder(target, UPCYCLE_TARGET)
    directory = checkpoint_folder(src)
    if not directory.is_dir():
        raise CheckpointError(f"source checkpoint folder {directory} not found")
    data = read_config_json(directory)
    config = LoopLMConfig.from_hf_dict(data)  # rejects a non-Ouro config
    new_config = upcycled_config(data, factor, order)

    with ExitStack() as stack:
        readers = _source_tensors(directory, config, stack)
        plan = _plan(readers, config, factor, order)
        total = sum(_nbytes(meta) for _, _, meta in plan.values())
        done = 0

        def advance(nbytes: int) -> None:
            nonlocal done
            done += nbytes
            if progress is not None:
                progress(done, total)

        with staged_folder(target, what=UPCYCLE_TARGET) as staging:
            (staging / CONFIG_NAME).write_text(json.dumps(new_config, indent=2) + "\n")
            # Shard boundaries as save_pretrained draws them, planned on meta tensors (sizes only).
            shards = _shards({name: meta for name, (_, _, meta) in plan.items()}, max_shard_bytes)
            if len(shards) == 1:
                _write_safetensors(staging / SINGLE_FILE, plan, advance)
            else:
                weight_map = {}
                for i, shard in enumerate(shards, start=1):
                    name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                    _write_safetensors(staging / name, {k: plan[k] for k in shard}, advance)
                    weight_map.update(dict.fromkeys(shard, name))
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            for companion in COMPANION_FILES:
                if (directory / companion).is_file():
                    shutil.copyfile(directory / companion, staging / companion)
    return target


__all__ = ["COMPANION_FILES", "ORDERS", "layer_map", "upcycle_layers", "upcycled_config"]
