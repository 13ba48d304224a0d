"""A forward with shared keys and values (LoopLM.forward's shared_kv) against `last_step` decoding, which it must
reproduce, and the shared-KV loss of Stage I against the Stage I loss written out on that forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from looplm.model import IGNORE_INDEX, LoopLM, LoopLMConfig, StaticExit, generate, stage1_loss
from looplm.model.generation import left_pad

CONFIG = LoopLMConfig.preset("tiny", vocab_size=97, total_ut_steps=3)


def _model() -> LoopLM:
    torch.manual_seed(0)
    return LoopLM(CONFIG).eval()


@pytest.mark.parametrize("lengths", [(7, 7, 7), (9, 4, 6)], ids=["same-length", "left-padded"])
def test_a_shared_kv_forward_scores_the_second_generated_token_as_last_step_decoding_does(lengths):
    """The 2nd generated token is the first one decoded through the cache: under `last_step` every pass of it
    attends to the prompt's step-T keys and values and to its own. A shared-KV forward over prompt + 1st token,
    with the plain forward's step-T keys and values, must give it the same log-probability."""
    model = _model()
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, CONFIG.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    full_depth = StaticExit(CONFIG.total_ut_steps)
    decoded = {
        strategy: generate(model, prompts, max_new_tokens=2, exit_policy=full_depth, kv_cache=strategy)
        for strategy in ("last_step", "per_step")
    }
    last_step = decoded["last_step"]
    ids, mask = left_pad([p + t[:1] for p, t in zip(prompts, last_step.tokens, strict=True)], CONFIG.pad_token_id)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask, return_logits=False, return_kv=True)
        shared = model(ids, attention_mask=mask, return_logits=False, shared_kv=plain.kv[-1])
        logprobs = torch.log_softmax(model.lm_head(shared.hidden_states[-1][:, -1]).float(), -1)
    second = torch.tensor([t[1] for t in last_step.tokens])
    ours = logprobs.gather(-1, second[:, None]).squeeze(-1)
    assert ours.tolist() == pytest.approx([lp[1] for lp in last_step.logprobs], abs=1e-5)
    # The plain forward is per_step decoding, which scores the token differently: the check can fail.
    exact = torch.log_softmax(model.lm_head(plain.hidden_states[-1][:, -1]).float(), -1)
    assert not torch.allclose(exact.gather(-1, second[:, None]).squeeze(-1), ours, atol=1e-3)
    assert decoded["per_step"].tokens[0][0] == last_step.tokens[0][0]  # the 1st token comes from prefill


def test_the_shared_kv_loss_is_the_stage1_loss_of_the_shared_forward_and_trains_every_parameter():
    model = _model().train()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 10), generator=generator)
    labels = torch.randint(0, CONFIG.vocab_size, (2, 10), generator=generator)
    labels[0, :2] = IGNORE_INDEX
    counted = labels != IGNORE_INDEX
    beta = 0.05
    plain = stage1_loss(model, ids, labels, beta=beta)
    with_shared = stage1_loss(model, ids, labels, beta=beta, shared_kv_loss=0.5)
    # Written out: expected CE under the shared forward's exit distribution minus beta times its entropy.
    with torch.no_grad():
        shared = model(ids, shared_kv=model(ids, return_kv=True).kv[-1])
        ce = torch.stack([F.cross_entropy(lg.transpose(1, 2), labels, reduction="none") for lg in shared.logits], -1)
        p = shared.exit_probs
        expected = ((p * ce).sum(-1) + beta * torch.special.xlogy(p, p).sum(-1))[counted].mean()
    assert float(with_shared.shared_kv) == pytest.approx(float(expected), rel=1e-5)
    combined = float(plain.loss.detach()) + 0.5 * float(expected)
    assert float(with_shared.loss.detach()) == pytest.approx(combined, rel=1e-5)
    assert plain.shared_kv is None
    model.zero_grad()
    stage1_loss(model, ids, labels, beta=beta, shared_kv_loss=1.0).loss.backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    with pytest.raises(ValueError, match="shared_kv_loss=-1"):
        stage1_loss(model, ids, labels, beta=beta, shared_kv_loss=-1.0)
