"""The looped language model (Ouro, arXiv 2510.25741), the reference implementation, in one file.

Architectural choices, each as in the released Ouro models (ouro-spec.md §1-2, §12):
- Token embeddings enter once, at the start; there is no input re-injection and no prelude or coda.
- The whole N-layer stack runs T times with shared weights. T is a call argument (`num_steps`); T beyond the
  trained `total_ut_steps` is extrapolation and simply runs more passes.
- After every pass the shared final RMSNorm is applied. Its output h_t feeds three things: the LM head
  (the step's logits), the exit gate (the step's exit probability) and the next pass.
- Each layer is a "sandwich": norm -> op -> norm -> residual add, for attention and for the MLP:
      h = h + norm2(attn(norm1(h)));  h = h + norm4(mlp(norm3(h)))
  The checkpoint calls the four norms input_layernorm, input_layernorm_2, post_attention_layernorm and
  post_attention_layernorm_2 (names inherited from Qwen2; the third is the pre-MLP norm).
- Causal attention with grouped KV heads (KV head h // (heads / kv_heads)), rotate-half RoPE, softmax scale
  head_dim**-0.5, through scaled_dot_product_attention. SwiGLU MLP. No biases except the exit gate's.
- RMSNorm normalises in fp32, casts back to the input dtype, then multiplies by its gain.
- Exit gate: lambda_t = sigmoid(Linear(d, 1)(h_t)) per token; p_t = lambda_t * prod_{j<t}(1 - lambda_j) for
  t < T and p_T = prod_{j<T}(1 - lambda_j), so the leftover mass goes to the last step.
- Separate (untied) embedding and LM head unless the config ties them.

One option that Ouro does not have, off by default (`reinject_embedding`; off, the model is bit-identical to
the one above and its config.json is Ouro's): every pass after the first starts from
      x_t = h_{t-1} + rms_normalize(e)      (t = 2..T; x_1 = e, the token embedding)
with rms_normalize the RMSNorm without gain. Why this form: h_{t-1} leaves the final norm with RMS of its gain
(about 1), and the parameter-free normalised embedding has RMS 1 whatever the embedding's scale (0.02 at init),
so the injection is as strong as the state from the first step of training and stays bounded: the sum of two
bounded vectors cannot grow from pass to pass, which an unnormalised or learned injection could (Parcae traces
looped instability to the injection's norm, ouro-spec.md §12). It adds no tensor, so checkpoints keep Ouro's
tensor names and the Megatron conversion is unchanged; the config flag alone says how to run the loop. The
loop then has a fixed input to return to, which is what keeps states meaningful past the trained T (Huginn and
Parcae inject by concatenation + adapter, or by a decayed linear map; both add parameters).

This file holds the model and nothing else: objectives are in `objectives.py`, decoding with exit policies and
KV caches in `generation.py`, checkpoint I/O in `checkpoint.py`. Attribute names follow the Ouro checkpoint, so
`state_dict()` keys are its tensor names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import LoopLMConfig

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: [batch, kv_heads, seq, head_dim], RoPE applied


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, in fp32, cast back: RMSNorm without its gain (the re-injected embedding)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for rotate-half RoPE. positions: [batch, seq] -> each [batch, 1, seq, head_dim]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq  # [batch, seq, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: LoopLMConfig):
        super().__init__()
        d, hd = config.hidden_size, config.attention_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            hd,
        )
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        past: KV | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """Returns the attention output and this call's own keys and values (for a KV cache).

        `mask` is a boolean [batch, 1, queries, keys] (True = may attend), or None for plain causal
        attention; `past` holds earlier positions' keys and values, which come before x's positions.
        """
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        own_kv = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if mask is None and past is not None and seq > 1:
            raise ValueError("several new positions after a KV cache need an explicit mask")
        causal = mask is None and past is None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(out), own_kv


class MLP(nn.Module):
    def __init__(self, config: LoopLMConfig):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LoopLMConfig):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(d, eps)  # norm1: before attention
        self.input_layernorm_2 = RMSNorm(d, eps)  # norm2: after attention
        self.post_attention_layernorm = RMSNorm(d, eps)  # norm3: before the MLP
        self.post_attention_layernorm_2 = RMSNorm(d, eps)  # norm4: after the MLP

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        past: KV | None = None,
    ) -> tuple[torch.Tensor, KV]:
        a, kv = self.self_attn(self.input_layernorm(h), cos, sin, mask, past)
        h = h + self.input_layernorm_2(a)
        h = h + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(h)))
        return h, kv


class LoopLMBody(nn.Module):
    """Embedding, the shared layer stack, the final norm and the exit gate (`model.*` in the checkpoint)."""

    def __init__(self, config: LoopLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1, bias=True)


def exit_distribution(gate_logits: torch.Tensor) -> torch.Tensor:
    """p(t|x) from the per-step gate logits [..., T]: lambda_t * survival_{t-1}, leftover mass at T."""
    lam = torch.sigmoid(gate_logits.float())
    survival = torch.cumprod(1.0 - lam, dim=-1)  # S_t = prod_{j<=t} (1 - lambda_j)
    survival_before = torch.cat([torch.ones_like(lam[..., :1]), survival[..., :-1]], dim=-1)  # S_{t-1}
    return torch.cat([lam[..., :-1] * survival_before[..., :-1], survival_before[..., -1:]], dim=-1)


@dataclass
class LoopLMOutput:
    """What one forward pass of T steps gives, one entry per step t = 1..T.

    hidden_states[t-1] is h_t (after the final norm); gate_logits and exit_probs are [batch, seq, T];
    logits[t-1] is [batch, seq, vocab] (None when not asked for); kv[t-1][layer] the keys and values of that
    step and layer (None when not asked for).
    """

    hidden_states: list[torch.Tensor]
    gate_logits: torch.Tensor
    exit_probs: torch.Tensor
    logits: list[torch.Tensor] | None = None
    kv: list[list[KV]] | None = None
    probed_last: torch.Tensor | None = None  # the last pass run again on its input + probe (forward's `probe`)


class LoopLM(nn.Module):
    def __init__(self, config: LoopLMConfig):
        super().__init__()
        self.config = config
        self.model = LoopLMBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, initializer_range) for every matrix and the embedding; unit norm gains; zero gate bias."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, self.config.initializer_range)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    # ---------------------------------------------------------------- the loop

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.config.attention_head_dim, self.config.rope_theta, dtype)

    def recurrent_step(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        past: list[KV] | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """One pass through the whole shared stack, then the final norm: h_{t-1} -> h_t.

        Also returns each layer's keys and values of this pass; `past` gives each layer its cached ones.
        """
        step_kv = []
        for index, layer in enumerate(self.model.layers):
            h, kv = layer(h, cos, sin, mask, None if past is None else past[index])
            step_kv.append(kv)
        return self.model.norm(h), step_kv

    def pass_input(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """The input of a pass after the first, from the previous pass's h_{t-1} and the token embedding e:
        h_{t-1} (Ouro), or h_{t-1} + rms_normalize(e) with reinject_embedding (see the module docstring)."""
        if not self.config.reinject_embedding:
            return h
        return h + rms_normalize(embedding, self.config.rms_norm_eps)

    def exit_gate(self, h: torch.Tensor) -> torch.Tensor:
        """The gate's logit for each position of h_t: [batch, seq]."""
        return self.model.early_exit_gate(h).squeeze(-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        num_steps: int | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        return_logits: bool = True,
        return_kv: bool = False,
        probe: torch.Tensor | None = None,
        shared_kv: list[KV] | None = None,
    ) -> LoopLMOutput:
        """Run the loop T = num_steps times (default: the config's total_ut_steps) over a [batch, seq] batch.

        attention_mask: optional [batch, seq] of 1 for real tokens and 0 for left padding; positions then
        count real tokens only. Pass return_logits=False when the caller computes the per-step loss itself
        (objectives.py), so that T full-vocabulary logit tensors are never alive together. probe: a
        [batch, seq, hidden] displacement; the last pass is run once more on its input + probe and the result
        returned as probed_last (the contraction estimate of objectives.py compares it with h_T).
        shared_kv: one (keys, values) per layer for every position, e.g. step T's of an earlier forward over the
        same ids; every pass then attends to these for the earlier positions and to its own for the position
        itself, which is what decoding with a shared KV cache (`last_step`, `average`) does, here for all
        positions at once (the shared-KV loss of objectives.py trains on it).
        """
        steps = self.config.total_ut_steps if num_steps is None else num_steps
        if steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {steps}")
        batch, seq = input_ids.shape
        if seq > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {seq} tokens is longer than the context ({self.config.max_position_embeddings} positions)"
            )
        embedding = h = self.model.embed_tokens(input_ids)
        positions, mask = positions_and_mask(attention_mask, batch, seq, input_ids.device)
        cos, sin = self.rope(positions, h.dtype)
        if shared_kv is not None:
            mask = shared_kv_mask(mask, batch, seq, input_ids.device)
        hidden_states, gate_logits, kv = [], [], []
        probed_last = None
        for t in range(steps):
            if t > 0:
                h = self.pass_input(h, embedding)
            if probe is not None and t == steps - 1:
                probed_last, _ = self.recurrent_step(h + probe.to(h.dtype), cos, sin, mask)
            h, step_kv = self.recurrent_step(h, cos, sin, mask, shared_kv)
            hidden_states.append(h)
            gate_logits.append(self.exit_gate(h))
            if return_kv:
                kv.append(step_kv)
        gates = torch.stack(gate_logits, dim=-1)
        return LoopLMOutput(
            hidden_states=hidden_states,
            gate_logits=gates,
            exit_probs=exit_distribution(gates),
            logits=[self.lm_head(h) for h in hidden_states] if return_logits else None,
            kv=kv if return_kv else None,
            probed_last=probed_last,
        )

    # ---------------------------------------------------------------- conveniences over the other modules

    def generate(self, input_ids: Any, **kwargs: Any):
        """Decode with an exit policy and a KV cache strategy: see `generation.generate`."""
        from .generation import generate

        return generate(self, input_ids, **kwargs)

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> Path:
        """Write the Ouro HF layout (config.json + safetensors): see `checkpoint.save_pretrained`."""
        from .checkpoint import save_pretrained

        return save_pretrained(self, directory, **kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs: Any) -> LoopLM:
        """Load an Ouro HF checkpoint folder: see `checkpoint.load_pretrained`."""
        from .checkpoint import load_pretrained

        return load_pretrained(directory, **kwargs)


def positions_and_mask(
    attention_mask: torch.Tensor | None, batch: int, seq: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RoPE positions [batch, seq] and the boolean attention mask (None: plain causal, no padding).

    With left padding, positions count real tokens only, and a padded query attends to itself so that its
    softmax row is not empty (its output is never read).
    """
    if attention_mask is None or bool(attention_mask.all()):
        return torch.arange(seq, device=device).expand(batch, seq), None
    real = attention_mask.bool()
    positions = (real.long().cumsum(-1) - 1).clamp_min(0)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    mask = causal[None] & real[:, None, :]
    mask |= torch.eye(seq, dtype=torch.bool, device=device)[None]
    return positions, mask[:, None]


def shared_kv_mask(mask: torch.Tensor | None, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """The [batch, 1, seq, 2 seq] mask over (shared keys, own keys) of a forward with shared_kv: a query sees the
    shared keys of the positions before it (and not padding) and its own key, nothing else of its own pass."""
    before = torch.ones(seq, seq, dtype=torch.bool, device=device).tril(-1)[None, None]
    if mask is not None:  # padding: the causal-and-real mask of positions_and_mask, strictly below the diagonal
        before = before & mask
    own = torch.eye(seq, dtype=torch.bool, device=device)[None, None]
    return torch.cat([before.expand(batch, 1, seq, seq), own.expand(batch, 1, seq, seq)], dim=-1)
