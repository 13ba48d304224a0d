"""Model checkpoints of the Megatron LoopLM through dist_checkpointing, and the Ouro HF export/import.

- `save_model` / `load_model`: the model's sharded state dict in a folder, at any TP x PP x DP layout
  (megatron names layers by their global index, so a checkpoint written at PP=1 loads at PP=2 and back).
- `export_hf` / `import_hf`: the Ouro HF layout (safetensors + config.json) from and into any layout. A model with
  reinject_embedding exports it in config.json (no extra tensor); importing into a model built otherwise is an
  error, since the same tensors would compute another function.

Training checkpoints (optimizer state, RNG, trainer.json, `latest`, retention) are training mechanics and live in
`looplm.pipelines.training.checkpoints`. All functions here are collectives over the default process group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from ..config import ConfigError, LoopLMConfig
from .convert import (
    gather_pipeline_parallel,
    gather_tensor_parallel,
    hf_to_megatron,
    local_state,
    megatron_to_hf,
    shard,
    stage_state,
)


def barrier() -> None:
    """dist.barrier() when a process group exists (these helpers also run in one plain process)."""
    if dist.is_initialized():
        dist.barrier()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_model(model: torch.nn.Module, directory: str | Path) -> None:
    """The model's sharded state dict into an empty or new folder (collective)."""
    save_sharded({"model": model.sharded_state_dict()}, Path(directory))


def load_model(model: torch.nn.Module, directory: str | Path) -> None:
    """Load the model from a folder written by save_model (or a training checkpoint's state/), at any layout
    (collective)."""
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(directory))
    model.load_state_dict(state["model"], strict=True)


def save_sharded(sharded: dict[str, Any], directory: Path) -> None:
    """A sharded state dict (model, optimizer, ...) into `directory` with dist_checkpointing (collective)."""
    if rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    barrier()
    dist_checkpointing.save(sharded, str(directory))
    barrier()


def export_hf(model: torch.nn.Module, config: LoopLMConfig, directory: str | Path) -> Path | None:
    """Write the model as an Ouro HF checkpoint from any TP x PP layout (rank 0 writes; collective). Returns the
    folder on rank 0."""
    from ..checkpoint import save_pretrained
    from ..looplm import LoopLM

    state = megatron_to_hf(gather_pipeline_parallel(gather_tensor_parallel(local_state(model))), config)
    path = None
    if rank() == 0:
        # In the training dtype: a bf16 run exports bf16 weights, like the released Ouro checkpoints.
        reference = LoopLM(config).to(next(model.parameters()).dtype)
        reference.load_state_dict(state, strict=True)
        path = save_pretrained(reference, directory, overwrite=True)
    barrier()
    return path


def _loop_config(model: torch.nn.Module) -> LoopLMConfig | None:
    """The LoopLMConfig a (possibly wrapped) MegatronLoopLM was built with."""
    for module in model.modules():
        if isinstance(getattr(module, "loop_config", None), LoopLMConfig):
            return module.loop_config
    return None


def import_hf(model: torch.nn.Module, directory: str | Path) -> LoopLMConfig:
    """Load an Ouro HF checkpoint (a released Ouro model, or export_hf's) into the Megatron model at its TP x PP."""
    from ..checkpoint import load_pretrained

    reference = load_pretrained(directory)
    built = _loop_config(model)
    if built is not None and built.reinject_embedding != reference.config.reinject_embedding:
        raise ConfigError(
            f"{directory} holds a model with reinject_embedding={reference.config.reinject_embedding}, but this "
            f"model was built with reinject_embedding={built.reinject_embedding}: the same weights would compute "
            "another function; set the model's reinject_embedding to the checkpoint's"
        )
    full = hf_to_megatron({k: v.float() for k, v in reference.state_dict().items()}, reference.config)
    local = shard(
        full, parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    )
    dtype = next(model.parameters()).dtype
    local = stage_state(local, model)
    model.load_state_dict({k: v.to(dtype) for k, v in local.items()}, strict=True)
    return reference.config
