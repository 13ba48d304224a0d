"""The optimizer of the Megatron trainer: AdamW in one of two implementations behind the same three calls.

- `megatron`: megatron-core's optimizer from `get_megatron_optimizer`. With `optim.distributed` (the default) it
  is the DistributedOptimizer: gradients are reduce-scattered over DP, each DP rank keeps the fp32 main params
  and Adam moments of its shard only, and updated params are all-gathered back. With bf16 params it keeps fp32
  main params (mixed precision). Its state goes to dist_checkpointing in the "fully_reshardable" layout, so a
  checkpoint reshards over TP and DP. This is what GPU runs use; on CPU it runs through
  `cpu_shim.patch_megatron_optimizer`, which is how the tests exercise the GPU code path.
- `torch`: torch AdamW over Megatron DDP's fp32 `main_grad`s, fp32 params only. The CPU default: no patched
  megatron source involved.

Both decay matrices only (norm gains and biases get no weight decay), clip by the global gradient norm, and take
LR and weight decay from the trainer every step (`set_lr`), so the schedule stays a pure function of the step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from looplm.model.config import ConfigError
from looplm.model.megatron import cpu_shim

from .config import PretrainConfig


def uses_megatron_optimizer(config: PretrainConfig) -> bool:
    """Whether this run steps with megatron-core's optimizer (resolving optim.implementation='auto')."""
    implementation = config.optim.implementation
    if implementation == "auto":
        return torch.cuda.is_available() or config.parallel.params_dtype != torch.float32
    if implementation == "torch" and config.parallel.params_dtype != torch.float32:
        raise ConfigError(
            "optim.implementation='torch' steps fp32 params only; bf16 params need fp32 main params: "
            "use optim.implementation='megatron'"
        )
    return implementation == "megatron"


def uses_distributed_optimizer(config: PretrainConfig) -> bool:
    return uses_megatron_optimizer(config) and config.optim.distributed


def describe(config: PretrainConfig) -> str:
    """The optimizer this run steps with, as recorded with the run and in its checkpoints."""
    if not uses_megatron_optimizer(config):
        return "torch-adamw"
    return "megatron-distributed" if config.optim.distributed else "megatron"


def build_optimizer(model: torch.nn.Module, ddp: torch.nn.Module, config: PretrainConfig) -> Any:
    """AdamW over the trainable parameters of `model` (wrapped in Megatron DDP as `ddp`)."""
    optim = config.optim
    if not uses_megatron_optimizer(config):
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() > 1], "wd_mult": 1.0},
            {"params": [p for p in params if p.dim() <= 1], "wd_mult": 0.0},
        ]
        return torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=0.0
        )
    from megatron.core.optimizer import OptimizerConfig

    cpu_shim.patch_megatron_optimizer()  # a no-op with CUDA
    from megatron.core.optimizer import get_megatron_optimizer  # after the patch: it binds the optimizer classes

    bf16 = config.parallel.params_dtype == torch.bfloat16
    megatron_config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        adam_eps=optim.eps,
        clip_grad=optim.grad_clip,
        bf16=bf16,
        params_dtype=config.parallel.params_dtype,
        use_distributed_optimizer=optim.distributed,
    )
    return get_megatron_optimizer(megatron_config, [ddp])


def is_megatron(optimizer: Any) -> bool:
    return not isinstance(optimizer, torch.optim.Optimizer)


def gradient_norm(optimizer: Any, model: torch.nn.Module) -> torch.Tensor:
    """The L2 norm of the full (unsharded) gradient after finalize_model_grads, equal on every rank.

    Every group that holds a share of the parameters takes part: TP shards and PP stages are summed over the
    model-parallel group (TP x PP), each parameter counted once (TP-replicated ones on TP rank 0 only); after
    finalize_model_grads the DP replicas hold equal gradients, so DP adds nothing. The Megatron optimizer does
    the same over its own groups (the DistributedOptimizer's DP shards included), and prepare_grads copies the
    reduced gradients into its main params.
    """
    if is_megatron(optimizer):
        optimizer.prepare_grads()
        return torch.tensor(float(optimizer.get_grad_norm()), dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    for param in model.parameters():
        if param.requires_grad and param_is_not_tensor_parallel_duplicate(param):
            total += param.main_grad.double().pow(2).sum().cpu()
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return total.sqrt()


def set_lr(optimizer: Any, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group["wd_mult"]


def step(optimizer: Any, model: torch.nn.Module, norm: float, grad_clip: float) -> None:
    """Clip the gradients to `grad_clip` by their global norm `norm` (from gradient_norm) and update."""
    clip = min(1.0, grad_clip / (norm + 1e-6)) if grad_clip > 0 else 1.0
    if is_megatron(optimizer):
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        if clip < 1.0:
            for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
                if inner.get_parameters():
                    clip_grad_by_total_norm_fp32(inner.get_parameters(), grad_clip, norm)
        optimizer.step_with_ready_grads()
        return
    for param in model.parameters():
        if param.requires_grad:
            param.grad = param.main_grad.mul_(clip)
    optimizer.step()
