"""Pipeline parallelism of the loop (DESIGN.md decision 3): loop t is virtual pipeline chunk t.

The N shared layers are split over P stages and every micro-batch travels around the pipeline T times, so the
model computes (all N layers) x T, never each stage's own layers looped on their own. On every stage, loop t is
chunk t of megatron's interleaved schedule (`forward_backward_pipelining_with_interleaving`): the schedule sends
the output of (stage P-1, chunk t) to (stage 0, chunk t+1), which is exactly the step from loop t to loop t+1.
Megatron builds one module per chunk; here the T chunks of a stage are `LoopChunk` views that own no parameters
and call the stage's one MegatronLoopLM, so

- the T chunks share weights, and a weight's gradient accumulates over its T uses in the one `main_grad`;
- Megatron DDP wraps the stage once and sees each parameter once;
- T is a per-step argument: a schedule of T (Ouro's 8 -> 4) only changes how many views a step makes.

What travels between stages is h (the residual stream of the current pass) with the Stage I running per-token
accumulators (survival S_{t-1}, sum p*CE, sum p*log p) appended as extra channels: one tensor
[seq, batch, hidden + 3] (under sequence parallelism h is a slice of the sequence and the channels carry all TP
slices of the accumulators, so every TP rank has them whole, as at PP=1). Megatron's p2p sends it as it would
send h, and autograd carries the gradient of the accumulators back through the pipeline like any activation.
Stage 0 embeds in chunk 0; the last stage applies the final norm, the LM head, the per-token CE and the exit
gate at the end of every loop and folds them into the accumulators (`losses.stage1_step`); its chunk T-1
returns the Stage I LossOutput.

The schedule reads its settings from the config of the chunks it is given, so each step hands it a copy of the
model's TransformerConfig with the step's chunk count (virtual_pipeline_model_parallel_size = T), a micro-batch
group of all M micro-batches, and the packed width as hidden_size. Megatron's constraint M >= P (the first loop
of micro-batch 0 must have left the last stage before stage 0 starts loop 2) is checked by the trainer's config.
With T = 1 there is one chunk and the step runs megatron's non-interleaved 1F1B.

Loop-robust options (objectives.py): a drawn T per step and `reinject_embedding` work here (the first stage
recomputes the embedding at the start of each loop t > 0, from the stage's own weights, so only h travels and
the embedding's gradient sums over its uses); the contraction and KV consistency terms do not (they would need
a second state, or each stage's step-t keys and values kept until loop T, to travel the ring), and the
trainer's config refuses them with parallel.pipeline_parallel > 1.

The bubble is the interleaved schedule's: (P-1)/(M*T) of a step, against (P-1)/M for 1F1B over a stage that
looped its own layers.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..objectives import LossOutput
from . import losses

ACCUMULATORS = 3  # survival, sum p*CE, sum p*log p


def _sequence_split(config: Any) -> int:
    """Under sequence parallelism h holds 1/TP of the sequence while the accumulators cover all of it."""
    return config.tensor_model_parallel_size if config.sequence_parallel else 1


def packed_width(config: Any) -> int:
    """Channels of what travels between stages: h, then the accumulators (all TP ranks' sequence slices under
    SP, so every TP rank keeps the full accumulators, as the loss it computes needs)."""
    return config.hidden_size + ACCUMULATORS * _sequence_split(config)


def pack(h: torch.Tensor, state: losses.Stage1State, config: Any) -> torch.Tensor:
    """h [seq(/TP), batch, hidden] and the accumulators ([seq, batch] each) as one [seq(/TP), batch, width] tensor."""
    accumulators = torch.stack(state, dim=-1)  # [seq, batch, 3]
    split = _sequence_split(config)
    if split > 1:  # [seq, b, 3] -> [split, seq/split, b, 3] -> [seq/split, b, split * 3]
        seq, batch = accumulators.shape[:2]
        accumulators = accumulators.view(split, seq // split, batch, ACCUMULATORS).permute(1, 2, 0, 3)
        accumulators = accumulators.reshape(seq // split, batch, split * ACCUMULATORS)
    return torch.cat([h, accumulators.to(h.dtype)], dim=-1)


def unpack(packed: torch.Tensor, config: Any) -> tuple[torch.Tensor, losses.Stage1State]:
    h, accumulators = packed.split([config.hidden_size, packed.shape[-1] - config.hidden_size], dim=-1)
    split = _sequence_split(config)
    if split > 1:
        local, batch = accumulators.shape[:2]
        accumulators = accumulators.reshape(local, batch, split, ACCUMULATORS).permute(2, 0, 1, 3)
        accumulators = accumulators.reshape(split * local, batch, ACCUMULATORS)
    survival, expected_ce, plogp = accumulators.float().unbind(-1)
    return h, (survival, expected_ce, plogp)


class StepStatistics:
    """Per-micro-batch detached figures the last stage collects loop by loop (CE_t and p_t means)."""

    def __init__(self) -> None:
        self.ce: dict[int, list[torch.Tensor]] = {}
        self.p: dict[int, list[torch.Tensor]] = {}

    def add(self, micro: int, ce: torch.Tensor, p: torch.Tensor) -> None:
        self.ce.setdefault(micro, []).append(ce)
        self.p.setdefault(micro, []).append(p)

    def pop(self, micro: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.ce.pop(micro), self.p.pop(micro)


class LoopChunk(torch.nn.Module):
    """Loop `loop` (0-based) of `num_steps` on this pipeline stage: a virtual pipeline chunk with no parameters
    of its own. It runs the stage's layers (and on the last stage the end of the loop) on the stage's module."""

    def __init__(self, stage: torch.nn.Module, loop: int, num_steps: int, config: Any, statistics: StepStatistics):
        super().__init__()
        # Kept out of the module tree: the chunk must not own (or re-register) the stage's parameters.
        self.__dict__["stage"] = stage
        self.loop, self.num_steps, self.vp_stage = loop, num_steps, loop
        self.config, self.model_type = config, stage_module(stage).model_type
        self.statistics = statistics
        self.input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, input_tensor: list[torch.Tensor | None] | torch.Tensor | None) -> None:
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def forward(
        self, micro: int, input_ids: torch.Tensor, labels: torch.Tensor, *, beta: float
    ) -> torch.Tensor | LossOutput:
        model = stage_module(self.stage)
        labels_sb, counted = losses.labels_sb(input_ids, labels)
        if self.loop == 0 and model.pre_process:
            h = model.embed(input_ids)
            state = losses.stage1_initial_state(labels_sb)
        else:
            if self.input_tensor is None:
                raise RuntimeError(f"loop {self.loop} on stage {_stage_rank()} received no input tensor")
            h, state = unpack(self.input_tensor, model.config)
            if model.pre_process and model.loop_config.reinject_embedding:  # the start of loop t > 0
                h = model.pass_input(h, model.embed(input_ids))
        h = model.recurrent_step(h, model.attention_inputs(input_ids.shape[1], input_ids.device))
        if not model.post_process:
            return pack(h, state, model.config)
        state, ce, p = losses.stage1_step(model, h, labels_sb, state, self.loop, self.num_steps)
        self.statistics.add(micro, ce[counted].mean().detach(), p[counted].mean().detach())
        if self.loop < self.num_steps - 1:
            return pack(h, state, model.config)
        ce_means, p_means = self.statistics.pop(micro)
        return losses.stage1_output(state, counted, beta, ce_means, p_means)


def stage_module(model: torch.nn.Module) -> torch.nn.Module:
    """The MegatronLoopLM inside wrappers (Megatron DDP's .module)."""
    while not hasattr(model, "pre_process") and hasattr(model, "module"):
        model = model.module
    return model


def _stage_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_rank()


def schedule_config(stage: torch.nn.Module, num_steps: int, num_microbatches: int) -> Any:
    """The TransformerConfig the pipeline schedule reads for one step (a copy; the model's own is unchanged)."""
    model = stage_module(stage)
    config = copy.copy(model.config)
    config.hidden_size = packed_width(model.config)  # what travels between stages
    config.virtual_pipeline_model_parallel_size = num_steps if num_steps > 1 else None
    # All M micro-batches go through loop t before loop t+1 starts on a stage (megatron's "group" of
    # micro-batches per virtual stage); M >= P keeps loop t+1 from waiting on loop t.
    config.microbatch_group_size_per_vp_stage = num_microbatches
    # With the loop the pipeline is a ring: stage 0 receives loop t+1 from stage P-1. At P = 2 the previous and
    # the next stage are one peer, and megatron's batched p2p posts "recv from prev" (an activation) and "recv
    # from next" (a gradient) to that peer in an order its sends do not follow, so the two get swapped. The
    # unbatched path orders sends and receives by even/odd rank, which matches.
    config.batch_p2p_comm = False
    return config


def loop_chunks(stage: torch.nn.Module, num_steps: int, num_microbatches: int) -> list[LoopChunk]:
    """The T chunks of one step on this stage, sharing one statistics collector."""
    config = schedule_config(stage, num_steps, num_microbatches)
    statistics = StepStatistics()
    return [LoopChunk(stage, t, num_steps, config, statistics) for t in range(num_steps)]
