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

Three optional Stage I terms aim at a loop that stays good past its trained T and whose steps agree (none is in
Ouro; all are off at weight 0, and then nothing extra is computed):

- contraction (weight `contraction_penalty`): a finite-difference estimate of the gain of the last pass
  f: x_T -> h_T (the whole shared stack and the final norm),
      c = ||f(x_T + delta) - f(x_T)||^2 / ||delta||^2,   delta = CONTRACTION_PROBE_SCALE * N(0, I),
  over the whole [batch, seq, hidden] tensor: a one-probe Hutchinson estimate of ||J||_F^2 / n, the mean squared
  singular value of the pass's Jacobian, as in the Jacobian regularisation of deep equilibrium models (Bai et
  al. 2021). Why a finite difference and not a JVP or a vector-Jacobian product: it costs one more forward pass
  (f(x_T) = h_T is already there), its gradient is an ordinary backward (no double backward, which megatron's
  checkpointed layers do not support), and at a finite scale it measures the secant gain ||f(x)-f(y)||/||x-y||
  that contraction is about. The last pass is the one that is iterated when the model runs past T. x_T is not
  detached: the gradient also moves the trajectory towards states where the map contracts, for no extra pass.
  The probe is drawn from `probe_seed` alone, so the term is deterministic and the Megatron model draws the
  same probe (in its own layout).
- kv_consistency (weight `kv_consistency`): the mean over layers and steps t < T of
      mean (K_t - sg K_T)^2 + mean (V_t - sg V_T)^2,
  the keys and values each step already computes (sg: stop-gradient). Decoding with one shared KV cache
  (`last_step`) lets step t attend to step T's keys and values, so it is exact when they agree. The stop-gradient
  moves the earlier steps towards step T, never step T's (the per-step quality at T) towards worse earlier
  steps. RoPE rotates K_t and K_T at a position alike, so the term is the same before or after RoPE. 0 at T = 1.
- shared_kv (weight `shared_kv_loss`): the Stage I loss of a second forward over the same tokens in which every
  pass attends to the first forward's step-T keys and values for the earlier positions and to its own for the
  position itself (LoopLM.forward's shared_kv): what `last_step` decoding computes at each position. So the
  model is trained as it decodes with one shared cache, instead of being pulled towards agreeing keys and
  values in the hope that decoding follows. Nothing is detached: step T's keys and values also learn to serve
  the earlier passes. It costs a second forward and backward.

Per-step cross-entropy is computed one step at a time, and the LM head plus the loss of a step run under
activation checkpointing: only h_t is kept for backward and the step's [batch, seq, vocab] logits are rebuilt
when its gradient is needed, so T full-vocabulary logit tensors are never alive together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .looplm import LoopLM, LoopLMOutput, exit_distribution

IGNORE_INDEX = -100
STAGE2_K = 50.0
STAGE2_GAMMA = 0.005
CONTRACTION_PROBE_SCALE = 0.1  # delta per channel, against a state of RMS ~1 (the final norm's output)


@dataclass
class LossOutput:
    """A scalar loss plus what is worth logging: per-step CE, mean exit distribution and its entropy."""

    loss: torch.Tensor
    ce_per_step: torch.Tensor  # [T], mean over counted tokens, detached
    exit_probs_mean: torch.Tensor  # [T], detached
    entropy: torch.Tensor  # mean per-token entropy of p, detached
    num_tokens: int
    contraction: torch.Tensor | None = None  # the contraction estimate c (detached), when its weight is > 0
    kv_consistency: torch.Tensor | None = None  # the KV consistency term (detached), when its weight is > 0
    shared_kv: torch.Tensor | None = None  # the shared-KV forward's Stage I loss (detached), when its weight is > 0


def contraction_probe(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """delta of the contraction estimate, [batch, seq, hidden] fp32 on the CPU: a function of the seed alone."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * CONTRACTION_PROBE_SCALE


def kv_consistency_term(kv: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> torch.Tensor:
    """mean over layers and t < T of mean (K_t - sg K_T)^2 + mean (V_t - sg V_T)^2; kv[t][layer] = (K, V)."""
    last = kv[-1]
    terms = [
        (k.float() - last[layer][0].detach().float()).pow(2).mean()
        + (v.float() - last[layer][1].detach().float()).pow(2).mean()
        for step in kv[:-1]
        for layer, (k, v) in enumerate(step)
    ]
    if not terms:  # T = 1: one step agrees with itself
        return torch.zeros((), device=last[0][0].device)
    return torch.stack(terms).mean()


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
    contraction_penalty: float = 0.0,
    kv_consistency: float = 0.0,
    shared_kv_loss: float = 0.0,
    probe_seed: int = 0,
) -> LossOutput:
    """Stage I: expected per-step CE under the exit distribution minus beta times its entropy, plus the optional
    loop-robust terms (module docstring) with weights contraction_penalty, kv_consistency and shared_kv_loss.

    labels[b, i] is the token that follows position i (already shifted), IGNORE_INDEX where not counted.
    probe_seed draws the contraction probe.
    """
    counted = _check_labels(input_ids, labels)
    if min(contraction_penalty, kv_consistency, shared_kv_loss) < 0:
        raise ValueError(f"weights must be >= 0, got {contraction_penalty=}, {kv_consistency=}, {shared_kv_loss=}")
    probe = None
    if contraction_penalty > 0:
        shape = (*input_ids.shape, model.config.hidden_size)
        probe = contraction_probe(shape, probe_seed).to(input_ids.device)
    out = model(
        input_ids,
        num_steps,
        attention_mask=attention_mask,
        return_logits=False,
        return_kv=kv_consistency > 0 or shared_kv_loss > 0,
        probe=probe,
    )
    per_token, ce_means, entropy = _stage1_per_token(model, out, labels, counted, beta)
    loss = per_token[counted].mean()
    p = out.exit_probs
    contraction = consistency = shared = None
    if probe is not None:
        difference = (out.probed_last.float() - out.hidden_states[-1].float()).pow(2).sum()
        contraction = difference / probe.pow(2).sum()
        loss = loss + contraction_penalty * contraction
    if kv_consistency > 0:
        consistency = kv_consistency_term(out.kv)
        loss = loss + kv_consistency * consistency
    if shared_kv_loss > 0:
        again = model(input_ids, num_steps, attention_mask=attention_mask, return_logits=False, shared_kv=out.kv[-1])
        shared = _stage1_per_token(model, again, labels, counted, beta)[0][counted].mean()
        loss = loss + shared_kv_loss * shared
    return LossOutput(
        loss=loss,
        ce_per_step=torch.stack(ce_means),
        exit_probs_mean=p[counted].mean(0).detach(),
        entropy=entropy[counted].mean().detach(),
        num_tokens=int(counted.sum()),
        contraction=None if contraction is None else contraction.detach(),
        kv_consistency=None if consistency is None else consistency.detach(),
        shared_kv=None if shared is None else shared.detach(),
    )


def _stage1_per_token(
    model: LoopLM, out: LoopLMOutput, labels: torch.Tensor, counted: torch.Tensor, beta: float
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Per token: sum_t p_t CE_t - beta H(p) [batch, seq]; the mean CE of each step (detached); H(p)."""
    p = out.exit_probs  # [batch, seq, T], fp32
    expected_ce = torch.zeros_like(p[..., 0])
    ce_means = []
    for t, h in enumerate(out.hidden_states):
        ce = step_token_losses(model, h, labels)
        expected_ce = expected_ce + p[..., t] * ce
        ce_means.append(ce[counted].mean().detach())
    entropy = -torch.special.xlogy(p, p).sum(-1)
    return expected_ce - beta * entropy, ce_means, entropy


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
