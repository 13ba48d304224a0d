"""Training checkpoints of the Megatron trainer: model + optimizer through dist_checkpointing, RNG states,
trainer counters, an atomic `latest` and retention.

A checkpoint is a folder `<root>/step_<n>/` holding
- `state/`: one dist_checkpointing save of the model and the optimizer. The optimizer is either torch AdamW,
  whose moments are sharded exactly like their parameters (megatron's optim_state_to_sharding_state), or
  megatron-core's optimizer (DistributedOptimizer included), which writes its own sharded state in the
  "fully_reshardable" layout (fp32 main params and moments, one tensor per parameter). Both reshard: a run saved
  at TP=1 resumes at TP=2, one saved at DP=2 resumes at DP=1, one saved at PP=1 resumes at PP=2 (megatron names
  layers by their global index), and the other way round;
- `rank_<r>.pt`: each rank's RNG states (restored when the layout is unchanged);
- `trainer.json`: step, layout and trainer counters (rank 0). LR, beta, T and the data position are pure
  functions of the step, so the step restores them.
It is written into `step_<n>.tmp/` and renamed into place only when every rank has finished, and `latest`
(a one-line file, replaced atomically) is updated after the rename, so a crash at any point leaves `latest`
naming a complete checkpoint.

A checkpoint can still be damaged after the fact (a full disk, a copy cut short, a bad sector). `resume_point`,
run by the launching driver before any worker starts, reads every file's header and checks each `.distcp` file
against the sizes the checkpoint's own index (`state/.metadata`) records; an unreadable latest checkpoint is set
aside as `step_<n>.unreadable`, `latest` moves to the newest readable one, and the driver says so. Deciding once,
in the driver, makes every rank resume from the same step, and an error that no restart can heal (no readable
checkpoint at all) stops the launch instead of spending the FailureConfig's retries.

The model-only save/load and the Ouro HF export live with the model (`looplm.model.megatron.checkpointing`).
All functions here are collectives over the default process group unless they say otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map, optim_state_to_sharding_state
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from looplm.model.atomic import atomic_write_text
from looplm.model.checkpoint import CheckpointError
from looplm.model.megatron.checkpointing import barrier, load_model, rank, save_sharded

LATEST = "latest"
STEP_FOLDER = re.compile(r"step_\d{8}")  # a complete checkpoint's folder name (not .tmp, not .unreadable)
UNREADABLE = ".unreadable"  # the suffix of a checkpoint set aside by resume_point


def _initialise_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter the state torch's Adam(W) creates lazily on its first step (so all have a shard)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def optimizer_sharded_state_dict(
    optimizer: torch.optim.Optimizer, model_sharded: dict[str, Any], *, is_loading: bool = False
) -> dict[str, Any]:
    """A torch Adam(W) state dict whose moments are ShardedTensors laid out like their parameters."""
    if is_loading or not optimizer.state:
        _initialise_adam_state(optimizer)
    state = optimizer.state_dict()
    state["state"] = {index: dict(entry) for index, entry in state["state"].items()}  # not the live state dicts
    steps = {float(s.pop("step")) for s in state["state"].values() if "step" in s}
    if len(steps) > 1:
        raise ValueError(f"optimizer steps differ between parameters ({sorted(steps)}); expected one shared step")
    params = chain.from_iterable(group["params"] for group in optimizer.param_groups)
    optim_state_to_sharding_state(state, get_param_id_to_sharded_param_map(model_sharded, params))
    state["state"]["common_step"] = steps.pop() if steps else 0.0
    return state


def _optimizer_sharded(optimizer: Any, model_sharded: dict[str, Any], *, is_loading: bool) -> dict[str, Any]:
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer_sharded_state_dict(optimizer, model_sharded, is_loading=is_loading)
    # megatron.core.optimizer (MegatronOptimizer / ChainedOptimizer): its own sharded state dict. The
    # DistributedOptimizer's "fully_reshardable" layout is one tensor per parameter (gathered over DP at save
    # time), so its state reshards over TP and DP; 0.16.1's parallel "fully_sharded_model_space" layout fails
    # there ("flattened_range is not supported") and "dp_reshardable" cannot change TP.
    # Its torch AdamW (the fallback without TE/apex) creates state lazily, and the state dict needs a step.
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        _initialise_adam_state(inner.optimizer)
    metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
    return optimizer.sharded_state_dict(model_sharded, is_loading=is_loading, metadata=metadata)


def _load_optimizer_state(optimizer: Any, state: dict[str, Any]) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        _load_megatron_optimizer_state(optimizer, state)
        return
    step = state["state"].pop("common_step")
    for param_state in state["state"].values():
        param_state["step"] = torch.tensor(float(step))
    optimizer.load_state_dict(state)


def _load_megatron_optimizer_state(optimizer: Any, state: dict[str, Any]) -> None:
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [state] if len(inners) == 1 else [state[index] for index in sorted(state)]
    for inner, inner_state in zip(inners, states, strict=True):
        param_state = inner_state.pop("param_state", None)
        sharding = inner_state.pop("param_state_sharding_type", None)
        inner.load_state_dict(inner_state)
        if param_state is not None:  # a DistributedOptimizer: the sharded fp32 main params and moments
            if sharding != "fully_reshardable":
                raise ValueError(f"distributed optimizer state of type {sharding!r}; looplm writes 'fully_reshardable'")
            # megatron-core 0.16.1 copies every per-parameter entry of the inner optimizer's state from the
            # checkpoint, torch AdamW's "step" included, which the checkpoint keeps per param group (KeyError:
            # 'step'). Set the steps aside while the sharded tensors load. (TE/apex FusedAdam keep no such step.)
            steps = {param: entry.pop("step") for param, entry in inner.optimizer.state.items() if "step" in entry}
            inner.load_parameter_state_from_fully_reshardable(param_state)
            for param, step in steps.items():
                inner.optimizer.state[param]["step"] = step
        # It also gives every parameter the same "step" tensor, which torch AdamW increments in place once per
        # parameter: each parameter needs its own.
        for entry in inner.optimizer.state.values():
            if "step" in entry:
                entry["step"] = entry["step"].clone()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _layout() -> dict[str, int]:
    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
    }


def save(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: Any,
    trainer_state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write step_<step>/ atomically and point `latest` at it (collective). Returns the final folder.

    With `keep`, only the newest `keep` complete checkpoints remain; older ones go after `latest` has moved.
    """
    root = Path(root)
    final, staging = root / f"step_{step:08d}", root / f"step_{step:08d}.tmp"
    if rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    model_sharded = model.sharded_state_dict()
    optim_sharded = _optimizer_sharded(optimizer, model_sharded, is_loading=False)
    save_sharded({"model": model_sharded, "optimizer": optim_sharded}, staging / "state")
    torch.save({"rng": rng_state()}, staging / f"rank_{rank()}.pt")
    if rank() == 0:
        record = {"step": step, "layout": _layout(), **trainer_state}
        (staging / "trainer.json").write_text(json.dumps(record, indent=2) + "\n")
    barrier()
    if rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        atomic_write_text(root / LATEST, final.name + "\n")
        if keep is not None:
            for old in _step_folders(root)[:-keep]:
                shutil.rmtree(old)
    barrier()
    return final


def _step_folders(root: Path) -> list[Path]:
    """The renamed-into-place checkpoint folders under root, oldest first."""
    return sorted(p for p in root.glob("step_*") if p.is_dir() and STEP_FOLDER.fullmatch(p.name))


def latest(root: str | Path) -> Path | None:
    """The folder `latest` names, or None when there is no complete checkpoint (not a collective)."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    folder = Path(root) / pointer.read_text().strip()
    return folder if (folder / "trainer.json").is_file() else None


def problem(folder: str | Path) -> str | None:
    """Why `folder` cannot be loaded, naming the file, or None when every file reads (not a collective).

    Reads trainer.json, every rank's RNG file, the dist_checkpointing metadata and common state, and the index
    of the tensor files; each `.distcp` file must hold the bytes the index places in it (a truncated file does
    not). Tensor bytes themselves are not read: a checkpoint of a large model stays cheap to check.
    """
    from torch.distributed.checkpoint import FileSystemReader

    folder = Path(folder)
    current = folder / "trainer.json"
    try:
        record = json.loads(current.read_text())
        ranks = record["layout"]["world_size"]
        for r in range(ranks):
            current = folder / f"rank_{r}.pt"
            torch.load(current, weights_only=False)["rng"]
        current = folder / "state" / "metadata.json"
        json.loads(current.read_text())
        current = folder / "state" / "common.pt"
        torch.load(current, weights_only=False)
        current = folder / "state" / ".metadata"
        index = FileSystemReader(str(folder / "state")).read_metadata()
        needed: dict[str, int] = {}
        for item in index.storage_data.values():
            needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
        for name, size in sorted(needed.items()):
            current = folder / "state" / name
            if current.stat().st_size < size:
                return f"{current}: {current.stat().st_size} bytes, its index needs at least {size} (truncated)"
    except Exception as err:  # whatever a damaged file raises (EOFError, UnpicklingError, JSONDecodeError, ...)
        reason = str(err).strip().split("\n")[0].split(". ")[0]  # torch's zip errors run on for 5 sentences
        return f"{current}: {type(err).__name__}: {reason}"
    return None


def resume_point(root: str | Path, say=print) -> Path | None:
    """The checkpoint a launch resumes from: the one `latest` names when it reads, else the newest older one that
    does (`latest` moves to it, the unreadable ones are renamed `step_<n>.unreadable`; each is said). When `latest`
    names a folder that is not there, the newest readable step folder. None without any checkpoint; CheckpointError
    when there are checkpoints but none reads (nothing is moved then). Not a collective: the driver runs it before
    the workers start."""
    root = Path(root)
    pointer = root / LATEST
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    folders = _step_folders(root)
    if named is not None and named.is_dir():
        candidates = [named, *reversed([p for p in folders if p.name < named.name])]
    else:
        if named is not None:
            say(f"{pointer} names {named.name}, which is not there")
        candidates = list(reversed(folders))
    if not candidates:
        return None
    unreadable: list[tuple[Path, str]] = []
    for folder in candidates:
        found = problem(folder)
        if found is None:
            break
        unreadable.append((folder, found))
    else:  # nothing is set aside: the folders stay as they are for a person to inspect
        raise CheckpointError(
            f"no readable checkpoint in {root}: "
            + "; ".join(found for _, found in unreadable)
            + ". Remove the folder (or choose another --output) to train from scratch"
        )
    if folder != named:  # first: a crash from here on leaves `latest` naming a readable checkpoint
        atomic_write_text(pointer, folder.name + "\n")
    for damaged, found in unreadable:
        aside = damaged.with_name(damaged.name + UNREADABLE)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(damaged, aside)
        say(f"checkpoint {damaged} cannot be loaded ({found}); set aside as {aside.name}")
    if folder != named:
        say(f"falling back to the previous complete checkpoint {folder}")
    return folder


def load(folder: str | Path, model: torch.nn.Module, optimizer: Any | None) -> dict[str, Any]:
    """Restore model, optimizer (at any TP x PP x DP layout) and, on an unchanged layout, each rank's RNG states.

    Returns trainer.json (collective).
    """
    folder = Path(folder)
    record = json.loads((folder / "trainer.json").read_text())
    if optimizer is None:
        load_model(model, folder / "state")
        return record
    model_sharded = model.sharded_state_dict()
    sharded = {
        "model": model_sharded,
        "optimizer": _optimizer_sharded(optimizer, model_sharded, is_loading=True),
    }
    try:
        state = dist_checkpointing.load(sharded, str(folder / "state"))
    except Exception as err:  # dist_checkpointing's errors name no file: name the checkpoint at least
        raise CheckpointError(f"checkpoint {folder}: {folder / 'state'} cannot be loaded: {err}") from err
    model.load_state_dict(state["model"], strict=True)
    _load_optimizer_state(optimizer, state["optimizer"])
    if record["layout"] == _layout():
        rng_file = folder / f"rank_{rank()}.pt"
        try:
            rng = torch.load(rng_file, weights_only=False)["rng"]
        except Exception as err:
            raise CheckpointError(f"checkpoint {folder}: {rng_file} cannot be loaded: {err}") from err
        set_rng_state(rng)
    return record
