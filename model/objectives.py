"""The two training objectives of Ouro (ouro-spec.md §3-4), on the reference LoopLM.

Stage I trains the LM and the exit gate together:
    L = sum_t p(t|x) * CE_t  -  beta * H(p(.|x)),   H(p) = -sum_t p_t log p_t
per token, averaged over the tokens whose label is not IGNORE_INDEX. Gradient reaches the LM through every
CE_t (weighted by p) and the gate through p and H; nothing is detached.

Stage II trains the gate alone on a frozen LM:
    I_t = max(0, CE_{t-1} - CE_t)            (detached per-token losses, t = 2..T)
    w_t = sigmoid(k * (I_t - gamma))         (k = 50, gamma = 0.005: "keep going" target)
    L   = (1/T) * sum_{t=2..T} BCE(1 - lambda_t, w_t)
The sum starts at t = 2 and the normaliser is T, both as the paper writes them.

Per-step cross-entropy is computed one step at a time, and the LM head plus the loss of a step run under
activation checkpointing: only h_t is kept for backward and the step's [batch, seq, vocab] logits are rebuilt
when its gradient is needed, so T full-vocabulary logit tensors are never alive together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .looplm import LoopLM, exit_distribution

IGNORE_INDEX = -100
STAGE2_K = 50.0
STAGE2_GAMMA = 0.005


@dataclass
class LossOutput:
    """A scalar loss plus what is worth logging: per-step CE, mean exit distribution and its entropy."""

    loss: torch.Tensor
    ce_per_step: torch.Tensor  # [T], mean over counted tokens, detached
    exit_probs_mean: torch.Tensor  # [T], detached
    entropy: torch.Tensor  # mean per-token entropy of p, detached
    num_tokens: int


def _token_cross_entropy(lm_head: torch.nn.Module, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = lm_head(h).float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none").view_as(
        labels
    )


def step_token_losses(model: LoopLM, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token CE [batch, seq] of one step's h_t; logits are rebuilt in backward, not stored."""
    if torch.is_grad_enabled() and h.requires_grad:
        return checkpoint(_token_cross_entropy, model.lm_head, h, labels, use_reentrant=False)
    return _token_cross_entropy(model.lm_head, h, labels)


def _check_labels(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
    counted = labels != IGNORE_INDEX
    if not bool(counted.any()):
        raise ValueError("every label is IGNORE_INDEX: there is no token to compute a loss on")
    return counted


def stage1_loss(
    model: LoopLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float,
    num_steps: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> LossOutput:
    """Stage I: expected per-step CE under the exit distribution minus beta times its entropy.

    labels[b, i] is the token that follows position i (already shifted), IGNORE_INDEX where not counted.
    """
    counted = _check_labels(input_ids, labels)
    out = model(input_ids, num_steps, attention_mask=attention_mask, return_logits=False)
    p = out.exit_probs  # [batch, seq, T], fp32
    expected_ce = torch.zeros_like(p[..., 0])
    ce_means = []
    for t, h in enumerate(out.hidden_states):
        ce = step_token_losses(model, h, labels)
        expected_ce = expected_ce + p[..., t] * ce
        ce_means.append(ce[counted].mean().detach())
    entropy = -torch.special.xlogy(p, p).sum(-1)
    per_token = expected_ce - beta * entropy
    return LossOutput(
        loss=per_token[counted].mean(),
        ce_per_step=torch.stack(ce_means),
        exit_probs_mean=p[counted].mean(0).detach(),
        entropy=entropy[counted].mean().detach(),
        num_tokens=int(counted.sum()),
    )


def stage2_loss(
    model: LoopLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_steps: int | None = None,
    attention_mask: torch.Tensor | None = None,
    k: float = STAGE2_K,
    gamma: float = STAGE2_GAMMA,
) -> LossOutput:
    """Stage II: BCE of the continue probability (1 - lambda_t) against the improvement target w_t.

    The LM runs without autograd, so no LM weight can receive a gradient; only the exit gate does.
    """
    counted = _check_labels(input_ids, labels)
    with torch.no_grad():
        out = model(input_ids, num_steps, attention_mask=attention_mask, return_logits=False)
        ce = torch.stack([step_token_losses(model, h, labels) for h in out.hidden_states], dim=-1)
    gate_logits = torch.stack([model.exit_gate(h) for h in out.hidden_states], dim=-1)
    return stage2_from_step_losses(ce, gate_logits, counted, k=k, gamma=gamma)


def stage2_from_step_losses(
    ce: torch.Tensor, gate_logits: torch.Tensor, counted: torch.Tensor, *, k: float, gamma: float
) -> LossOutput:
    """The Stage II loss from detached per-token CE and the gate logits, both [..., T], over `counted` tokens.

    Shared by the reference and the Megatron model (whose tensors are [seq, batch, T]).
    """
    steps = ce.shape[-1]
    gate_logits = gate_logits.float()
    improvement = (ce[..., :-1] - ce[..., 1:]).clamp_min(0.0)  # I_t for t = 2..T
    target = torch.sigmoid(k * (improvement - gamma))
    # BCE(1 - lambda, w) with 1 - lambda = sigmoid(-gate_logit), in the numerically stable logits form.
    bce = F.binary_cross_entropy_with_logits(-gate_logits[..., 1:], target, reduction="none")
    loss = bce[counted].mean(0).sum() / steps if steps > 1 else gate_logits.sum() * 0.0
    p = exit_distribution(gate_logits.detach())
    return LossOutput(
        loss=loss,
        ce_per_step=ce[counted].mean(0),
        exit_probs_mean=p[counted].mean(0),
        entropy=(-torch.special.xlogy(p, p).sum(-1))[counted].mean(),
        num_tokens=int(counted.sum()),
    )


def gate_parameters(model: LoopLM) -> list[torch.nn.Parameter]:
    """The parameters Stage II trains: the exit gate's weight and bias, nothing else."""
    return list(model.model.early_exit_gate.parameters())
