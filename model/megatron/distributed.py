"""Process groups and gradient synchronisation for the Megatron LoopLM: the few megatron-core calls around it."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from . import cpu_shim
from .config import ParallelConfig


def initialize_model_parallel(parallel: ParallelConfig, seed: int) -> None:
    """Split the (already initialised) default process group into TP x PP x DP groups and seed the RNGs.

    Re-initialises cleanly if groups exist (tests build several layouts in one process).
    """
    cpu_shim.check()
    if not torch.distributed.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
    world = torch.distributed.get_world_size()
    cells = parallel.tensor_parallel * parallel.pipeline_parallel
    if world % cells:
        raise ValueError(
            f"world size {world} is not a multiple of tensor_parallel x pipeline_parallel "
            f"({parallel.tensor_parallel} x {parallel.pipeline_parallel})"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
    )
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def wrap_data_parallel(
    model: torch.nn.Module, use_distributed_optimizer: bool = False, per_token_loss: bool = False
) -> DistributedDataParallel:
    """Megatron DDP over the data-parallel group: gradients accumulate in fp32 `main_grad` buffers and are
    averaged over DP by `finalize_model_grads`, which also all-reduces sequence-parallel norm gains over TP.
    With `per_token_loss` (megatron's calculate_per_token_loss, what the trainer's schedules use) they are summed
    over DP instead, and finalize_model_grads divides them by the step's token count.
    With `use_distributed_optimizer` they are reduce-scattered instead (each DP rank keeps its optimizer shard's
    part), as megatron's DistributedOptimizer expects. Only parameters with requires_grad are bucketed
    (Stage II freezes the LM before wrapping)."""
    model.config.calculate_per_token_loss = per_token_loss  # read by DDP here and by the schedules
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=use_distributed_optimizer
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
