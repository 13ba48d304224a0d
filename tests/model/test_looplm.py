"""The reference LoopLM against independent computations: an unrolled model, textbook attention, closed forms."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from looplm.model import LoopLM, LoopLMConfig, exit_distribution

CONFIG = LoopLMConfig.preset("tiny", vocab_size=97, num_hidden_layers=2, total_ut_steps=3)


def _model(config=CONFIG):
    model = LoopLM(config)
    with torch.no_grad():  # non-trivial norm gains and gate bias, so a mix-up of norms shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


class Unrolled(torch.nn.Module):
    """N*T distinct layers and T distinct final norms, copied from a looped model: no weight sharing."""

    def __init__(self, looped: LoopLM, steps: int):
        super().__init__()
        self.looped = looped
        self.layers = torch.nn.ModuleList(copy.deepcopy(layer) for _ in range(steps) for layer in looped.model.layers)
        self.norms = torch.nn.ModuleList(copy.deepcopy(looped.model.norm) for _ in range(steps))
        self.embed = copy.deepcopy(looped.model.embed_tokens)
        self.head = copy.deepcopy(looped.lm_head)

    def forward(self, ids):
        seq = ids.shape[1]
        cos, sin = self.looped.rope(torch.arange(seq).expand(ids.shape), torch.float32)
        h, logits = self.embed(ids), []
        n = len(self.looped.model.layers)
        for t, norm in enumerate(self.norms):
            for layer in self.layers[t * n : (t + 1) * n]:
                h, _ = layer(h, cos, sin)
            h = norm(h)
            logits.append(self.head(h))
        return logits


def test_loop_equals_unrolled_model_and_shared_grads_sum():
    model = _model()
    steps = CONFIG.total_ut_steps
    unrolled = Unrolled(model, steps)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 11))
    looped_logits = model(ids).logits
    unrolled_logits = unrolled(ids)
    for a, b in zip(looped_logits, unrolled_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    weights = torch.randn(steps)  # a loss that touches every step differently
    sum(w * x.pow(2).mean() for w, x in zip(weights, looped_logits, strict=True)).backward()
    sum(w * x.pow(2).mean() for w, x in zip(weights, unrolled_logits, strict=True)).backward()
    n = CONFIG.num_hidden_layers
    for index, layer in enumerate(model.model.layers):
        for name, param in layer.named_parameters():
            copies = [dict(unrolled.layers[t * n + index].named_parameters())[name].grad for t in range(steps)]
            torch.testing.assert_close(param.grad, sum(copies), rtol=1e-5, atol=1e-7)
    norm_copies = sum(norm.weight.grad for norm in unrolled.norms)
    torch.testing.assert_close(model.model.norm.weight.grad, norm_copies, rtol=1e-5, atol=1e-7)


def _textbook_layer(layer, h, config):
    """One sandwich layer written out with explicit softmax attention (no SDPA), per the Ouro code."""

    def rms(x, norm):
        return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps))

    batch, seq, _ = h.shape
    heads, kv_heads, hd = config.num_attention_heads, config.num_key_value_heads, config.attention_head_dim
    attn = layer.self_attn
    x = rms(h, layer.input_layernorm)
    q = (x @ attn.q_proj.weight.T).view(batch, seq, heads, hd)
    k = (x @ attn.k_proj.weight.T).view(batch, seq, kv_heads, hd)
    v = (x @ attn.v_proj.weight.T).view(batch, seq, kv_heads, hd)
    # Rotate-half RoPE: pair dimension i with i + hd/2.
    inv = config.rope_theta ** (-torch.arange(0, hd, 2).float() / hd)
    angle = torch.arange(seq).float()[:, None] * inv[None]  # [seq, hd/2]
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]

    def rope(t):
        a, b = t[..., : hd // 2], t[..., hd // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    q, k = rope(q), rope(k)
    out = torch.empty(batch, seq, heads, hd)
    for head in range(heads):
        kv = head // (heads // kv_heads)  # KV head h // group size (repeat_interleave)
        scores = torch.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, kv]) / math.sqrt(hd)
        scores = scores.masked_fill(~torch.ones(seq, seq, dtype=torch.bool).tril(), float("-inf"))
        out[:, :, head] = torch.einsum("bqk,bkd->bqd", scores.softmax(-1), v[:, :, kv])
    a = out.reshape(batch, seq, heads * hd) @ attn.o_proj.weight.T
    h = h + rms(a, layer.input_layernorm_2)
    f = rms(h, layer.post_attention_layernorm)
    mlp = layer.mlp
    f = (F.silu(f @ mlp.gate_proj.weight.T) * (f @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    return h + rms(f, layer.post_attention_layernorm_2)


def test_forward_matches_textbook_computation():
    model = _model()
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9))
    out = model(ids)
    with torch.no_grad():
        h = model.model.embed_tokens.weight[ids]
        for t in range(CONFIG.total_ut_steps):
            for layer in model.model.layers:
                h = _textbook_layer(layer, h, CONFIG)
            norm = model.model.norm
            h = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + CONFIG.rms_norm_eps))
            torch.testing.assert_close(out.hidden_states[t], h, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.logits[t], h @ model.lm_head.weight.T, rtol=1e-5, atol=1e-5)
            gate = h @ model.model.early_exit_gate.weight[0] + model.model.early_exit_gate.bias
            torch.testing.assert_close(out.gate_logits[..., t], gate, rtol=1e-5, atol=1e-5)


def test_exit_distribution_sums_to_one_and_matches_closed_form():
    gate_logits = torch.randn(3, 5, 4) * 2
    p = exit_distribution(gate_logits)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 5))
    lam = torch.sigmoid(gate_logits)
    expected = torch.stack(
        [
            lam[..., 0],
            lam[..., 1] * (1 - lam[..., 0]),
            lam[..., 2] * (1 - lam[..., 0]) * (1 - lam[..., 1]),
            (1 - lam[..., 0]) * (1 - lam[..., 1]) * (1 - lam[..., 2]),  # leftover; lambda_T ignored
        ],
        dim=-1,
    )
    torch.testing.assert_close(p, expected)
    # CDF(n) = 1 - prod_{j<=n}(1 - lambda_j) for n < T.
    torch.testing.assert_close(p[..., :2].sum(-1), 1 - (1 - lam[..., 0]) * (1 - lam[..., 1]))
    assert torch.equal(exit_distribution(torch.randn(2, 1)), torch.ones(2, 1))  # T = 1: all mass at step 1


def test_num_steps_is_a_call_argument_and_extrapolates():
    model = _model()
    ids = torch.randint(0, CONFIG.vocab_size, (1, 7))
    short, trained, extrapolated = model(ids, 1), model(ids), model(ids, 6)
    assert len(short.logits) == 1 and len(trained.logits) == 3 and len(extrapolated.logits) == 6
    assert extrapolated.exit_probs.shape == (1, 7, 6)
    for t in range(3):  # the first steps do not depend on how many follow
        torch.testing.assert_close(extrapolated.logits[t], trained.logits[t], rtol=0, atol=0)
    torch.testing.assert_close(extrapolated.exit_probs.sum(-1), torch.ones(1, 7))
    with pytest.raises(ValueError, match="num_steps"):
        model(ids, 0)


def test_left_padding_does_not_change_real_tokens():
    model = _model()
    ids = torch.randint(4, CONFIG.vocab_size, (1, 6))
    alone = model(ids).logits
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], dim=1).long()
    together = model(padded, attention_mask=mask).logits
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(b[:, 3:], a, rtol=1e-5, atol=1e-5)


def test_sequence_longer_than_context_is_an_error():
    model = _model(LoopLMConfig.preset("tiny", max_position_embeddings=8))
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 9, dtype=torch.long))
