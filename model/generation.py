"""Decoding with real early exit: a token that exits at step t never computes steps t+1..T.

Prefill runs all T steps over the prompt (every step needs its own keys there; ouro-spec.md §5.2) and fills
the KV cache. Each decoded token then runs the shared stack step by step; after each step the exit policy
decides, per sequence, whether the token stops. Sequences that stop leave the batch for the remaining steps,
so the skipped steps are not computed. The token is read out from the LM head at its exit step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .exit_policy import ExitPolicy, QExit, select_exit_steps, step_cdf
from .kv_cache import KVCache
from .looplm import LoopLM, positions_and_mask


@dataclass
class GenerationOutput:
    """Per sequence: the new tokens (a stop token is not included), the exit step (1..T) of each new
    token, its log-probability under the exit step's distribution (before temperature), and why it ended:
    "stop" (a stop token) or "length" (max_new_tokens or the context)."""

    tokens: list[list[int]]
    exit_steps: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    num_steps: int


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> left-padded ids and a 1/0 attention mask, both [batch, longest]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, longest - len(prompt) :] = 1
    return ids, mask


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Greedy when temperature == 0; otherwise temperature, then top-k, then top-p (nucleus) sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


@torch.no_grad()
def generate(
    model: LoopLM,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    num_steps: int | None = None,
    exit_policy: ExitPolicy | None = None,
    kv_cache: str = "per_step",
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
) -> GenerationOutput:
    """Generate up to max_new_tokens per prompt.

    input_ids: a [batch, seq] tensor (no padding) or a list of token-id lists of any lengths (left-padded
    here). num_steps: T (default: the config's total_ut_steps). exit_policy: default Q-exit at the config's
    early_exit_threshold (1.0: every token runs all T steps). kv_cache: "per_step", "last_step" or "average".
    """
    config = model.config
    _check_sampling(temperature, top_k, top_p, max_new_tokens)
    steps = config.total_ut_steps if num_steps is None else num_steps
    if steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {steps}")
    policy = exit_policy if exit_policy is not None else QExit(config.early_exit_threshold)
    device = model.lm_head.weight.device
    if isinstance(input_ids, torch.Tensor):
        ids, prompt_mask = input_ids.to(device), torch.ones_like(input_ids, device=device)
    else:
        ids, prompt_mask = left_pad(input_ids, config.pad_token_id)
        ids, prompt_mask = ids.to(device), prompt_mask.to(device)
    batch, prompt_len = ids.shape
    context = config.max_position_embeddings
    if prompt_len > context:
        raise ValueError(f"prompt of {prompt_len} tokens is longer than the context ({context} positions)")
    budget = min(max_new_tokens, context - prompt_len)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stops = torch.as_tensor(list(stop_token_ids), dtype=torch.long, device=device)

    tokens: list[list[int]] = [[] for _ in range(batch)]
    exit_log: list[list[int]] = [[] for _ in range(batch)]
    logprob_log: list[list[float]] = [[] for _ in range(batch)]
    reasons = ["length"] * batch
    if budget == 0:
        return GenerationOutput(tokens, exit_log, logprob_log, reasons, steps)

    # Prefill: all T steps over the prompt, every step's keys and values kept for the cache.
    out = model(ids, steps, attention_mask=prompt_mask, return_logits=False, return_kv=True)
    cache = KVCache(
        kv_cache,
        num_layers=config.num_hidden_layers,
        num_steps=steps,
        batch=batch,
        kv_heads=config.num_key_value_heads,
        head_dim=config.attention_head_dim,
        capacity=prompt_len + budget,
        dtype=out.hidden_states[0].dtype,
        device=device,
    )
    cache.prefill(out.kv)
    last = [h[:, -1] for h in out.hidden_states]
    exit_steps = select_exit_steps(last, out.gate_logits[:, -1], policy)
    final_h = torch.stack(last, dim=1)[torch.arange(batch, device=device), exit_steps - 1]
    del out

    positions, _ = positions_and_mask(prompt_mask, batch, prompt_len, device)
    next_position = positions[:, -1] + 1
    padded = not bool(prompt_mask.all())
    key_mask = torch.cat([prompt_mask.bool(), torch.ones(batch, budget, dtype=torch.bool, device=device)], 1)
    running = torch.arange(batch, device=device)  # sequences still generating

    for i in range(budget):
        logits = model.lm_head(final_h)
        next_tokens = sample_next(logits, temperature, top_k, top_p, generator)
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, next_tokens[:, None])[:, 0]
        is_stop = torch.isin(next_tokens, stops)
        for row, token, step, logprob, stop in zip(
            running.tolist(),
            next_tokens.tolist(),
            exit_steps.tolist(),
            logprobs.tolist(),
            is_stop.tolist(),
            strict=True,
        ):
            if stop:
                reasons[row] = "stop"
            else:
                tokens[row].append(token)
                exit_log[row].append(step)
                logprob_log[row].append(logprob)
        keep = ~is_stop
        running, next_tokens = running[keep], next_tokens[keep]
        if running.numel() == 0 or i == budget - 1:
            break
        rows = None if running.numel() == batch else running
        final_h, exit_steps = _decode_one(
            model, cache, next_tokens, next_position[running], rows, key_mask if padded else None, steps, policy
        )
        cache.commit(exit_steps, rows)
        next_position = next_position + 1
    return GenerationOutput(tokens, exit_log, logprob_log, reasons, steps)


def _decode_one(
    model: LoopLM,
    cache: KVCache,
    token_ids: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    steps: int,
    policy: ExitPolicy,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one new token per row through the loop, step by step, dropping rows as they exit.

    Returns each row's h at its exit step and the exit step (1-indexed).
    """
    count = token_ids.shape[0]
    embedding = h = model.model.embed_tokens(token_ids)[:, None]  # [rows, 1, d]
    cos, sin = model.rope(positions[:, None], h.dtype)
    mask = None
    if key_mask is not None:
        all_rows = torch.arange(key_mask.shape[0], device=h.device) if rows is None else rows
        mask = key_mask[all_rows, : cache.length + 1][:, None, None]
    final_h = torch.empty(count, h.shape[-1], dtype=h.dtype, device=h.device)
    exit_steps = torch.empty(count, dtype=torch.long, device=h.device)
    active = torch.arange(count, device=h.device)  # positions within this call's rows
    survival = torch.ones(count, device=h.device)
    h_prev = None
    for t in range(1, steps + 1):
        cache_rows = _compose(rows, active, count)
        past = [cache.past(t, layer, cache_rows) for layer in range(model.config.num_hidden_layers)]
        if t > 1:
            h = model.pass_input(h, embedding)
        h, step_kv = model.recurrent_step(h, cos, sin, mask, past)
        for layer, kv in enumerate(step_kv):
            cache.record(t, layer, cache_rows, kv)
        cdf, survival = step_cdf(survival, model.exit_gate(h)[:, 0], last=t == steps)
        done = policy.exits(t, cdf, h[:, 0], h_prev) | (t == steps)
        final_h[active[done]] = h[done, 0]
        exit_steps[active[done]] = t
        if bool(done.all()):
            break
        stay = ~done
        active, h, survival, embedding = active[stay], h[stay], survival[stay], embedding[stay]
        cos, sin = cos[stay], sin[stay]
        mask = None if mask is None else mask[stay]
        h_prev = h[:, 0]
    return final_h, exit_steps


def _compose(rows: torch.Tensor | None, active: torch.Tensor, count: int) -> torch.Tensor | None:
    """Batch rows of the still-active subset; None when that is every row of the batch, in order."""
    if active.numel() == count:
        return rows
    return active if rows is None else rows[active]
