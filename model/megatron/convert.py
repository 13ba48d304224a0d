"""Conversion between the reference model's Ouro HF layout and the Megatron LoopLM's, at any tensor parallelism.

Three layers of functions, each exact (pure reindexing, no arithmetic):
- `hf_to_megatron` / `megatron_to_hf`: Ouro names (`model.layers.{i}.self_attn.q_proj.weight`, ...) <-> the
  unsharded (TP = 1) Megatron state dict (`decoder.layers.{i}.self_attention.linear_qkv.weight`, ...).
- `shard` / `unshard`: the unsharded Megatron state <-> one state per TP rank.
- `gather_tensor_parallel` / `gather_pipeline_parallel` (in a process group): every TP rank's local tensors ->
  the unsharded state; every pipeline stage's layers -> all N layers.

Under pipeline parallelism a stage holds layers [offset, offset + N/P) as `decoder.layers.0..`; `local_state`
names them by their global index (megatron's layer_number - 1), and `stage_state` picks a stage's tensors out of
a full state, so every function above sees whole-model names.

Megatron's fused QKV is laid out per query group: for each KV head g, its (heads / kv_heads) query heads, then
its key, then its value, so a contiguous TP chunk holds whole groups. The gated MLP's fc1 is [gate; up] on each
rank, so its TP shards are cut from gate and up separately.
"""

from __future__ import annotations

import torch

from ..config import LoopLMConfig

# Ouro name inside a layer -> Megatron name inside a layer (one-to-one tensors).
_LAYER_NAMES = {
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "input_layernorm_2.weight": "post_self_attn_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "post_attention_layernorm_2.weight": "post_mlp_layernorm.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "final_layernorm.weight",
    "model.early_exit_gate.weight": "exit_gate.weight",
    "model.early_exit_gate.bias": "exit_gate.bias",
    "lm_head.weight": "output_layer.weight",
}
# Megatron name suffix -> the dimension TP splits (absent: replicated on every TP rank).
_PARTITION_DIM = {
    "embedding.word_embeddings.weight": 0,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc2.weight": 1,
    "output_layer.weight": 0,
}


def partition_dim(name: str) -> int | None:
    for suffix, dim in _PARTITION_DIM.items():
        if name.endswith(suffix):
            return dim
    return None


def _qkv_rows(config: LoopLMConfig) -> tuple[int, int]:
    return (
        config.num_attention_heads // config.num_key_value_heads * config.attention_head_dim,
        config.attention_head_dim,
    )


def hf_to_megatron(state: dict[str, torch.Tensor], config: LoopLMConfig) -> dict[str, torch.Tensor]:
    """Ouro HF state dict -> unsharded Megatron state dict. Every tensor must be used exactly once."""
    if config.tie_word_embeddings:
        raise ValueError("tied embeddings are not supported by the Megatron LoopLM")
    remaining = dict(state)

    def take(name: str) -> torch.Tensor:
        if name not in remaining:
            raise KeyError(f"Ouro state is missing {name!r}")
        return remaining.pop(name)

    out = {mega: take(hf) for hf, mega in _TOP_NAMES.items()}
    q_rows, kv_rows = _qkv_rows(config)
    groups = config.num_key_value_heads
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = take(src + "self_attn.q_proj.weight").view(groups, q_rows, -1)
        k = take(src + "self_attn.k_proj.weight").view(groups, kv_rows, -1)
        v = take(src + "self_attn.v_proj.weight").view(groups, kv_rows, -1)
        out[dst + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])
        gate, up = take(src + "mlp.gate_proj.weight"), take(src + "mlp.up_proj.weight")
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
        for hf_name, mega_name in _LAYER_NAMES.items():
            out[dst + mega_name] = take(src + hf_name)
    if remaining:
        raise KeyError(f"Ouro state has tensors the Megatron LoopLM does not: {sorted(remaining)[:5]}")
    return out


def megatron_to_hf(state: dict[str, torch.Tensor], config: LoopLMConfig) -> dict[str, torch.Tensor]:
    """Unsharded Megatron state dict -> Ouro HF state dict (the reference LoopLM's state_dict keys)."""
    remaining = dict(state)

    def take(name: str) -> torch.Tensor:
        if name not in remaining:
            raise KeyError(f"Megatron state is missing {name!r}")
        return remaining.pop(name)

    out = {hf: take(mega) for hf, mega in _TOP_NAMES.items()}
    q_rows, kv_rows = _qkv_rows(config)
    groups = config.num_key_value_heads
    for i in range(config.num_hidden_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = take(src + "self_attention.linear_qkv.weight")
        q, k, v = qkv.view(groups, q_rows + 2 * kv_rows, -1).split([q_rows, kv_rows, kv_rows], dim=1)
        out[dst + "self_attn.q_proj.weight"] = q.reshape(-1, qkv.shape[-1]).contiguous()
        out[dst + "self_attn.k_proj.weight"] = k.reshape(-1, qkv.shape[-1]).contiguous()
        out[dst + "self_attn.v_proj.weight"] = v.reshape(-1, qkv.shape[-1]).contiguous()
        gate, up = take(src + "mlp.linear_fc1.weight").chunk(2, dim=0)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate.contiguous(), up.contiguous()
        for hf_name, mega_name in _LAYER_NAMES.items():
            out[dst + hf_name] = take(src + mega_name)
    extra = [name for name in remaining if not name.endswith("_extra_state")]
    if extra:
        raise KeyError(f"Megatron state has tensors with no Ouro counterpart: {sorted(extra)[:5]}")
    return out


def shard(state: dict[str, torch.Tensor], tp_size: int, tp_rank: int) -> dict[str, torch.Tensor]:
    """The slice of an unsharded Megatron state dict that TP rank `tp_rank` of `tp_size` holds."""
    out = {}
    for name, tensor in state.items():
        dim = partition_dim(name)
        if dim is None:
            out[name] = tensor.clone()
        elif name.endswith("mlp.linear_fc1.weight"):
            gate, up = tensor.chunk(2, dim=0)
            out[name] = torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
        else:
            if tensor.shape[dim] % tp_size:
                raise ValueError(f"{name}: dimension {dim} of size {tensor.shape[dim]} does not split into {tp_size}")
            out[name] = tensor.chunk(tp_size, dim=dim)[tp_rank].clone()
    return out


def unshard(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Inverse of `shard`: the per-rank states of one TP group, in rank order -> the unsharded state."""
    out = {}
    for name, first in shards[0].items():
        dim = partition_dim(name)
        pieces = [s[name] for s in shards]
        if dim is None:
            out[name] = first.clone()
        elif name.endswith("mlp.linear_fc1.weight"):
            halves = [p.chunk(2, dim=0) for p in pieces]
            out[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        else:
            out[name] = torch.cat(pieces, dim=dim)
    return out


def _layer_offset(model: torch.nn.Module) -> int:
    """The global index of this stage's first layer (0 without pipeline parallelism)."""
    for module in model.modules():
        if hasattr(module, "decoder"):
            layers = module.decoder.layers
            return layers[0].layer_number - 1 if len(layers) else 0
    return 0


def _global_name(name: str, offset: int) -> str:
    marker = "decoder.layers."
    if offset == 0 or marker not in name:
        return name
    head, rest = name.split(marker, 1)
    index, tail = rest.split(".", 1)
    return f"{head}{marker}{int(index) + offset}.{tail}"


def stage_state(full: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of `full` (whole-model Megatron names) that this pipeline stage holds, by its local names."""
    offset = _layer_offset(model)
    names = [name for name in model.state_dict() if not name.endswith("_extra_state")]
    return {name: full[_global_name(name, offset)] for name in names}


def local_state(model: torch.nn.Module, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """This rank's tensors by Megatron name (layers by global index): parameters, or their gradients (Megatron
    DDP's main_grad if set)."""
    offset = _layer_offset(model)
    out = {}
    for name, param in model.named_parameters():
        if grads:
            grad = getattr(param, "main_grad", None)
            grad = param.grad if grad is None else grad
            out[name] = torch.zeros_like(param) if grad is None else grad.detach().clone()
        else:
            out[name] = param.detach().clone()
    return {_global_name(name.removeprefix("module."), offset): t.cpu() for name, t in out.items()}


def gather_tensor_parallel(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collective over the TP group: every rank's `local` state -> the unsharded state, on every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    size = parallel_state.get_tensor_model_parallel_world_size()
    if size == 1:
        return dict(local)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(size)]
    for name in sorted(local):
        pieces = [torch.empty_like(local[name]) for _ in range(size)]
        dist.all_gather(pieces, local[name].contiguous(), group=group)
        for rank, piece in enumerate(pieces):
            shards[rank][name] = piece
    return unshard(shards)


def gather_pipeline_parallel(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collective over the pipeline group: every stage's `local` state (global names) -> the union, on every rank.

    Exports and tests only: every stage's tensors pass through every rank of the group once.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return dict(local)
    stages: list[dict[str, torch.Tensor] | None] = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, local, group=parallel_state.get_pipeline_model_parallel_group())
    merged: dict[str, torch.Tensor] = {}
    for stage in stages:
        merged.update(stage)
    return merged
