"""Ouro's Stage I and Stage II objectives on the Megatron LoopLM; equal to `looplm.model.objectives`.

Stage I runs the loop step by step and keeps running per-token accumulators instead of stacking all T steps:
the survival S_{t-1}, sum_t p_t * CE_t and sum_t p_t log p_t, with p_t = lambda_t * S_{t-1} for t < T and
p_T = S_{T-1}. Only h_t and these [seq, batch] tensors live from one step to the next, which is what a
pipeline-parallel loop hands from stage to stage (DESIGN.md decision 3); autograd does the rest.

The loop-robust terms (contraction, KV consistency: `looplm.model.objectives`) are the reference's, computed
on this model's layout: the contraction probe is the reference's [batch, seq, hidden] draw, transposed and, under
sequence parallelism, cut to this rank's slice; sums over what a TP rank holds only in part (the SP slice of h,
its KV heads) are all-reduced over the TP group (gradient: identity, each rank owns its part).

Tensors are megatron's [seq, batch]; inputs and labels come in the reference's [batch, seq] layout.
"""

from __future__ import annotations

import torch

from ..objectives import (
    IGNORE_INDEX,
    STAGE2_GAMMA,
    STAGE2_K,
    LossOutput,
    contraction_probe,
    stage2_from_step_losses,
)


def labels_sb(input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
    labels = labels.t().contiguous()
    counted = labels != IGNORE_INDEX
    if not bool(counted.any()):
        raise ValueError("every label is IGNORE_INDEX: there is no token to compute a loss on")
    return labels, counted


Stage1State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # survival S_{t-1}, sum p*CE, sum p*log p


def stage1_initial_state(like: torch.Tensor) -> Stage1State:
    """The accumulators before the first step, [seq, batch] fp32: S_0 = 1 and two empty sums."""
    ones = torch.ones(like.shape[:2], dtype=torch.float32, device=like.device)
    return ones, torch.zeros_like(ones), torch.zeros_like(ones)


def stage1_step(
    model, h: torch.Tensor, labels: torch.Tensor, state: Stage1State, t: int, num_steps: int
) -> tuple[Stage1State, torch.Tensor, torch.Tensor]:
    """Fold step t's h_t (0-based) into the running accumulators: (new state, CE_t, p_t), per token [seq, batch].

    This is all that couples the steps, so it is what a pipeline hands on from loop to loop with h_t.
    """
    survival, expected_ce, plogp = state
    ce = model.step_token_losses(h, labels)
    if t < num_steps - 1:
        lam = torch.sigmoid(model.exit_gate_logits(h).float())
        p = lam * survival
        survival = survival * (1.0 - lam)
    else:  # the leftover mass goes to the last step; its own lambda is not used
        p = survival
    return (survival, expected_ce + p * ce, plogp + torch.special.xlogy(p, p)), ce, p


def stage1_output(
    state: Stage1State, counted: torch.Tensor, beta: float, ce_means: list[torch.Tensor], p_means: list[torch.Tensor]
) -> LossOutput:
    """The Stage I loss from the final accumulators, with the per-step means logged along the way."""
    _, expected_ce, plogp = state
    entropy = -plogp
    per_token = expected_ce - beta * entropy
    return LossOutput(
        loss=per_token[counted].mean(),
        ce_per_step=torch.stack(ce_means),
        exit_probs_mean=torch.stack(p_means),
        entropy=entropy[counted].mean().detach(),
        num_tokens=int(counted.sum()),
    )


def _tensor_parallel_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over the TP group of per-rank partial sums (all-reduce forward, identity backward)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return values
    return reduce_from_tensor_model_parallel_region(values)


def probe_sb(model, input_ids: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's contraction probe as this rank holds h ([seq(/TP under SP), batch, hidden]), and its
    squared norm over the whole tensor."""
    from megatron.core import parallel_state

    full = contraction_probe((*input_ids.shape, model.loop_config.hidden_size), seed)
    local = full.transpose(0, 1)
    if model.config.sequence_parallel:
        ranks = parallel_state.get_tensor_model_parallel_world_size()
        local = local.chunk(ranks, dim=0)[parallel_state.get_tensor_model_parallel_rank()]
    return local.contiguous().to(input_ids.device), full.pow(2).sum().to(input_ids.device)


def contraction_term(model, probed: torch.Tensor, h: torch.Tensor, probe_norm2: torch.Tensor) -> torch.Tensor:
    """||f(x_T + delta) - h_T||^2 / ||delta||^2 over the whole batch (under SP each rank holds a slice)."""
    difference = (probed.float() - h.float()).pow(2).sum()
    if model.config.sequence_parallel:
        difference = _tensor_parallel_sum(difference)
    return difference / probe_norm2


def kv_consistency_term(kv: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> torch.Tensor:
    """mean over layers and t < T of mean (K_t - sg K_T)^2 + mean (V_t - sg V_T)^2, kv[t][layer] = this rank's
    (K, V) [seq, batch, local KV heads, head_dim]: squared sums over the local heads, summed over TP."""
    from megatron.core import parallel_state

    last = kv[-1]
    if len(kv) == 1:
        return torch.zeros((), device=last[0][0].device)
    sums = torch.stack(
        [
            torch.stack(
                [
                    (k.float() - last[layer][0].detach().float()).pow(2).sum(),
                    (v.float() - last[layer][1].detach().float()).pow(2).sum(),
                ]
            )
            for step in kv[:-1]
            for layer, (k, v) in enumerate(step)
        ]
    )  # [(T-1) x layers, 2]
    sums = _tensor_parallel_sum(sums)
    elements = last[0][0].numel() * parallel_state.get_tensor_model_parallel_world_size()
    return (sums.sum(-1) / elements).mean()


def stage1_loss(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float,
    num_steps: int,
    contraction_penalty: float = 0.0,
    kv_consistency: float = 0.0,
    probe_seed: int = 0,
) -> LossOutput:
    """sum_t p(t|x) CE_t - beta * H(p), per token, averaged over counted tokens; plus the weighted loop-robust
    terms (the reference's, objectives.py), each computed only when its weight is > 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if contraction_penalty < 0 or kv_consistency < 0:
        raise ValueError(f"penalty weights must be >= 0, got {contraction_penalty=} and {kv_consistency=}")
    labels, counted = labels_sb(input_ids, labels)
    embedding = h = model.embed(input_ids)
    attention = model.attention_inputs(input_ids.shape[1], input_ids.device)
    state = stage1_initial_state(labels)
    ce_means, p_means, kv = [], [], []
    contraction = consistency = None
    for t in range(num_steps):
        if t > 0:
            h = model.pass_input(h, embedding)
        if contraction_penalty > 0 and t == num_steps - 1:
            probe, probe_norm2 = probe_sb(model, input_ids, probe_seed)
            probed = model.recurrent_step(h + probe.to(h.dtype), attention)
        if kv_consistency > 0:
            with model.capture_keys_values() as captured:
                h = model.recurrent_step(h, attention)
            kv.append(captured)
        else:
            h = model.recurrent_step(h, attention)
        state, ce, p = stage1_step(model, h, labels, state, t, num_steps)
        ce_means.append(ce[counted].mean().detach())
        p_means.append(p[counted].mean().detach())
    out = stage1_output(state, counted, beta, ce_means, p_means)
    if contraction_penalty > 0:
        contraction = contraction_term(model, probed, h, probe_norm2)
        out.loss = out.loss + contraction_penalty * contraction
        out.contraction = contraction.detach()
    if kv_consistency > 0:
        consistency = kv_consistency_term(kv)
        out.loss = out.loss + kv_consistency * consistency
        out.kv_consistency = consistency.detach()
    return out


def stage2_loss(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_steps: int,
    k: float = STAGE2_K,
    gamma: float = STAGE2_GAMMA,
) -> LossOutput:
    """(1/T) sum_{t=2..T} BCE(1 - lambda_t, sigmoid(k (max(0, CE_{t-1} - CE_t) - gamma))).

    The LM runs without autograd, so only the exit gate can receive a gradient.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    labels, counted = labels_sb(input_ids, labels)
    states, ces = [], []
    with torch.no_grad():
        embedding = h = model.embed(input_ids)
        attention = model.attention_inputs(input_ids.shape[1], input_ids.device)
        for t in range(num_steps):
            if t > 0:
                h = model.pass_input(h, embedding)
            h = model.recurrent_step(h, attention)
            states.append(h)
            ces.append(model.step_token_losses(h, labels))
    ce = torch.stack(ces, dim=-1)  # [seq, batch, T]
    gate_logits = torch.stack([model.exit_gate_logits(h) for h in states], dim=-1)
    return stage2_from_step_losses(ce, gate_logits, counted, k=k, gamma=gamma)
