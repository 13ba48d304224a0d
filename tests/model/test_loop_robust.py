"""The loop-robust options of the reference LoopLM against independent computations: re-injection (off: the
Ouro loop, bit for bit; on: h_{t-1} + e / rms(e)), the contraction estimate and the KV consistency term."""

from __future__ import annotations

import dataclasses
import json

import torch

from looplm.model import IGNORE_INDEX, LoopLM, LoopLMConfig, stage1_loss
from looplm.model.objectives import CONTRACTION_PROBE_SCALE, kv_consistency_term

CONFIG = LoopLMConfig.preset("tiny", vocab_size=101, total_ut_steps=3)


def _model(reinject: bool = False) -> LoopLM:
    torch.manual_seed(0)
    return LoopLM(dataclasses.replace(CONFIG, reinject_embedding=reinject))


def _batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=generator)
    labels = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=generator)
    labels[0, :3] = IGNORE_INDEX
    return ids, labels


def _unrolled(model: LoopLM, ids: torch.Tensor, steps: int, inject: bool, probe: torch.Tensor | None = None):
    """The loop written out layer by layer: pass inputs and h_t, with the embedding re-injected by hand."""
    e = model.model.embed_tokens(ids)
    cos, sin = model.rope(torch.arange(ids.shape[1]).expand(*ids.shape), e.dtype)
    h, inputs, states = e, [], []
    for t in range(steps):
        if t > 0 and inject:
            h = h + e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + CONFIG.rms_norm_eps)
        inputs.append(h)
        for layer in model.model.layers:
            h, _ = layer(h, cos, sin)
        h = model.model.norm(h)
        states.append(h)
    probed = None
    if probe is not None:
        probed = inputs[-1] + probe
        for layer in model.model.layers:
            probed, _ = layer(probed, cos, sin)
        probed = model.model.norm(probed)
    return states, probed


def test_without_reinjection_the_loop_is_ouro_bit_for_bit_and_with_it_each_later_pass_adds_the_normed_embedding():
    ids, _ = _batch()
    with torch.no_grad():
        for reinject in (False, True):
            model = _model(reinject)
            expected, _ = _unrolled(model, ids, 4, inject=reinject)
            got = model(ids, 4).hidden_states
            assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), reinject
        plain, injected = _model(False)(ids, 4).hidden_states, _model(True)(ids, 4).hidden_states
    assert torch.equal(plain[0], injected[0])  # the first pass starts from e either way
    assert not torch.allclose(plain[1], injected[1], atol=1e-3)


def test_reinjection_is_written_to_config_json_only_when_on_and_loads_back(tmp_path):
    assert "reinject_embedding" not in CONFIG.to_hf_dict()  # released Ouro configs stay as they are
    assert LoopLMConfig.from_hf_dict(CONFIG.to_hf_dict()).reinject_embedding is False
    model = _model(True)
    path = model.save_pretrained(tmp_path / "hf")
    assert json.loads((path / "config.json").read_text())["reinject_embedding"] is True
    loaded = LoopLM.from_pretrained(path)
    assert loaded.config.reinject_embedding is True
    ids, _ = _batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids).hidden_states[-1], model(ids).hidden_states[-1])


def test_contraction_term_is_the_last_pass_secant_gain_on_the_seeded_probe():
    ids, labels = _batch()
    model = _model(True)
    out = stage1_loss(model, ids, labels, beta=0.05, contraction_penalty=0.5, probe_seed=9)
    plain = stage1_loss(model, ids, labels, beta=0.05)
    probe = torch.randn((*ids.shape, CONFIG.hidden_size), generator=torch.Generator().manual_seed(9))
    probe = probe * CONTRACTION_PROBE_SCALE
    with torch.no_grad():
        states, probed = _unrolled(model, ids, CONFIG.total_ut_steps, inject=True, probe=probe)
    expected = (probed - states[-1]).pow(2).sum() / probe.pow(2).sum()
    assert out.contraction.item() > 0 and plain.contraction is None
    torch.testing.assert_close(out.contraction, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.loss, plain.loss + 0.5 * expected, rtol=1e-6, atol=0)
    again = stage1_loss(model, ids, labels, beta=0.05, contraction_penalty=0.5, probe_seed=9)
    other = stage1_loss(model, ids, labels, beta=0.05, contraction_penalty=0.5, probe_seed=10)
    assert torch.equal(again.contraction, out.contraction) and not torch.equal(other.contraction, out.contraction)


def test_kv_consistency_is_zero_at_one_step_positive_after_and_moves_only_the_earlier_steps():
    ids, labels = _batch()
    model = _model()
    one = stage1_loss(model, ids, labels, beta=0.05, num_steps=1, kv_consistency=3.0)
    assert one.kv_consistency.item() == 0.0
    torch.testing.assert_close(one.loss, stage1_loss(model, ids, labels, beta=0.05, num_steps=1).loss)
    out = model(ids, 3, return_kv=True)
    expected = torch.stack(
        [
            ((out.kv[t][layer][0] - out.kv[2][layer][0]) ** 2).mean()
            + ((out.kv[t][layer][1] - out.kv[2][layer][1]) ** 2).mean()
            for t in (0, 1)
            for layer in range(CONFIG.num_hidden_layers)
        ]
    ).mean()
    three = stage1_loss(model, ids, labels, beta=0.05, num_steps=3, kv_consistency=3.0)
    assert three.kv_consistency.item() > 0
    torch.testing.assert_close(three.kv_consistency, expected.detach(), rtol=1e-6, atol=0)
    # Stop-gradient on step T: the term moves step t's keys and values towards step T's, never the reverse.
    keys_t, keys_last = out.kv[0][0][0], out.kv[2][0][0]
    grad_t, grad_last = torch.autograd.grad(kv_consistency_term(out.kv), [keys_t, keys_last], allow_unused=True)
    assert grad_t.abs().sum() > 0
    assert grad_last is None or not grad_last.any()
