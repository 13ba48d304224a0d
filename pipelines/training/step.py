"""One optimizer step's forward and backward through megatron-core's pipeline schedules.

`forward_backward` hands the step's micro-batches to `get_forward_backward_func()` with a `forward_step` that
returns the model's output and `loss_function`:
- PP = 1: megatron's no-pipelining schedule; the model (Megatron DDP around MegatronLoopLM) runs the whole
  objective per micro-batch;
- PP > 1: the loop as virtual pipeline chunks (`looplm.model.megatron.pipeline`): megatron's interleaved
  schedule with T chunks that share the stage's weights (1F1B when T = 1). Stage I only: Stage II trains the
  exit gate alone and runs at PP = 1.

The loss is megatron's per-token loss (calculate_per_token_loss): each micro-batch contributes the sum of its
per-token losses, the schedule counts the tokens, and finalize_model_grads (called by the schedule, through
config.finalize_model_grads_func) sums gradients over DP and divides them by the global token count. So the
step's gradient is that of the mean over every counted token of the global batch, whatever the micro-batch,
DP and PP layout.

The loop-robust terms (loop.contraction_penalty, loop.kv_consistency) are added to each micro-batch's Stage I
loss at PP = 1, with micro-batch m's contraction probe drawn from probe_seed + m; being part of the micro-batch's
loss, they weigh by its token count like its CE (equal weights for equal micro-batches). The pipeline does not
carry them (model/megatron/pipeline.py), and the config refuses them with PP > 1.

`step_figures` turns the per-micro-batch figures that only the last stage holds into the same logged numbers
on every rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from looplm.model.megatron.pipeline import loop_chunks, stage_module
from looplm.model.objectives import LossOutput

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, labels), [micro_batch, seq]


def loss_function(out: LossOutput) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron's 3-tuple loss contract: (sum of per-token losses, token count, figures to log)."""
    tokens = torch.tensor(out.num_tokens, dtype=torch.int)
    loss_sum = out.loss * out.num_tokens
    figures = {
        "loss_sum": loss_sum.detach().float().clone(),
        "tokens": tokens.clone(),
        "entropy": out.entropy.detach().float(),
        "ce_per_step": out.ce_per_step.detach().float(),
        "exit_probs": out.exit_probs_mean.detach().float(),
        "contraction": _figure(out.contraction),
        "kv_consistency": _figure(out.kv_consistency),
    }
    return loss_sum, tokens, figures


def _figure(value: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros(()) if value is None else value.detach().float().cpu()


def forward_backward(
    ddp: torch.nn.Module,
    batches: list[Batch],
    *,
    objective: str,
    num_steps: int,
    beta: float,
    forward_only: bool = False,
    contraction_penalty: float = 0.0,
    kv_consistency: float = 0.0,
    probe_seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Forward (and backward, unless forward_only) of `batches` through the schedule. Returns the figures of
    every micro-batch on the last pipeline stage, [] on the others. Gradients end finalized (DP-reduced and
    divided by the global token count) in the main_grad buffers. contraction_penalty and kv_consistency weigh
    the Stage I loop-robust terms (PP = 1 only); micro-batch m draws its contraction probe from probe_seed + m."""
    model = stage_module(ddp)
    config = model.config
    if not config.calculate_per_token_loss:
        raise ValueError("the schedules' loss is per token: wrap with wrap_data_parallel(per_token_loss=True)")
    pipeline = parallel_state.get_pipeline_model_parallel_world_size()
    ids, _ = batches[0]
    micro_batch, seq = ids.shape
    config.finalize_model_grads_func = lambda _chunks, num_tokens, **_: finalize_model_grads([ddp], num_tokens)
    config.grad_scale_func = None
    penalties = {}
    if contraction_penalty > 0 or kv_consistency > 0:
        if objective != "stage1":
            raise ValueError(f"the loop-robust penalties are Stage I terms; objective {objective!r} has none")
        penalties = {"contraction_penalty": contraction_penalty, "kv_consistency": kv_consistency}
    if pipeline == 1:

        def forward_step(data_iterator, chunk):
            micro, (input_ids, labels) = next(data_iterator)
            seed = {"probe_seed": probe_seed + micro} if penalties else {}
            out = chunk(input_ids, labels, objective=objective, num_steps=num_steps, beta=beta, **penalties, **seed)
            return out, loss_function

        chunks: list[Any] = [ddp]
        iterators: Any = iter(list(enumerate(batches)))
        virtual = None
    else:
        if penalties:
            raise ValueError(
                "pipeline parallelism does not carry the contraction and KV consistency terms: set "
                "loop.contraction_penalty and loop.kv_consistency to 0 or run with parallel.pipeline_parallel=1"
            )
        if objective != "stage1":
            raise ValueError(f"pipeline parallelism runs the Stage I objective only, not {objective!r}")
        if len(batches) < pipeline:
            raise ValueError(
                f"{len(batches)} micro-batches per step cannot fill {pipeline} pipeline stages: "
                "the interleaved schedule needs at least pipeline_parallel micro-batches"
            )

        def forward_step(data_iterator, chunk):
            micro, (input_ids, labels) = next(data_iterator)
            return chunk(micro, input_ids, labels, beta=beta), loss_function

        chunks = loop_chunks(ddp, num_steps, len(batches))
        iterators = [iter(list(enumerate(batches))) for _ in chunks]
        virtual = num_steps if num_steps > 1 else None
        if virtual is None:
            iterators = iterators[0]
    schedule = get_forward_backward_func(pp_size=pipeline, vp_size=virtual)
    return schedule(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=chunks,
        num_microbatches=len(batches),
        seq_length=seq,
        micro_batch_size=micro_batch,
        forward_only=forward_only,
    )


def step_figures(figures: list[dict[str, torch.Tensor]], num_microbatches: int, num_steps: int) -> dict[str, Any]:
    """The step's logged figures, equal on every rank: loss = mean over every counted token of the global batch;
    entropy, per-step CE, exit probabilities and the loop-robust terms = means over micro-batches and DP ranks
    (collective)."""
    packed = torch.zeros(5 + 2 * num_steps, dtype=torch.float64)
    for record in figures:  # only the last pipeline stage has records
        packed[0] += record["loss_sum"].double()
        packed[1] += record["tokens"].double()
        packed[2] += record["entropy"].double()
        packed[3 : 3 + num_steps] += record["ce_per_step"].double()
        packed[3 + num_steps : 3 + 2 * num_steps] += record["exit_probs"].double()
        packed[-2] += record["contraction"].double()
        packed[-1] += record["kv_consistency"].double()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(packed, group=parallel_state.get_pipeline_model_parallel_group())
    dist.all_reduce(packed, group=parallel_state.get_data_parallel_group())
    micro_batches = num_microbatches * parallel_state.get_data_parallel_world_size()
    return {
        "loss": (packed[0] / packed[1]).item(),
        "tokens": int(packed[1].item()),
        "entropy": (packed[2] / micro_batches).item(),
        "ce_per_step": (packed[3 : 3 + num_steps] / micro_batches).tolist(),
        "exit_probs": (packed[3 + num_steps : 3 + 2 * num_steps] / micro_batches).tolist(),
        "contraction": (packed[-2] / micro_batches).item(),
        "kv_consistency": (packed[-1] / micro_batches).item(),
    }
