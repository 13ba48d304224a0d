"""Stage I and Stage II losses against a straightforward re-derivation from the paper's formulas."""

import pytest
import torch
import torch.nn.functional as F

from looplm.model import IGNORE_INDEX, LoopLM, LoopLMConfig, gate_parameters, stage1_loss, stage2_loss

CONFIG = LoopLMConfig.preset("tiny", vocab_size=101, total_ut_steps=4)


def _batch(seq=10):
    ids = torch.randint(0, CONFIG.vocab_size, (3, seq))
    labels = torch.randint(0, CONFIG.vocab_size, (3, seq))
    labels[0, :4] = IGNORE_INDEX  # some tokens are not counted
    labels[2, -1] = IGNORE_INDEX
    return ids, labels


def _naive_stage1(model, ids, labels, beta):
    """Every step's full logits at once, the exit distribution by its recursion, plain loops."""
    out = model(ids)
    lam = torch.sigmoid(out.gate_logits)
    steps = lam.shape[-1]
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for i in range(ids.shape[1]):
            if labels[b, i] == IGNORE_INDEX:
                continue
            survive, probs = 1.0, []
            for t in range(steps):
                probs.append(survive * lam[b, i, t] if t < steps - 1 else survive)
                survive = survive * (1 - lam[b, i, t])
            ce = [-F.log_softmax(out.logits[t][b, i], -1)[labels[b, i]] for t in range(steps)]
            expected = sum(p * c for p, c in zip(probs, ce, strict=True))
            entropy = -sum(p * torch.log(p) for p in probs)
            total = total + expected - beta * entropy
            count += 1
    return total / count


def test_stage1_loss_and_gradients_equal_rederivation():
    ids, labels = _batch()
    model = LoopLM(CONFIG)
    with torch.no_grad():
        model.model.early_exit_gate.bias.fill_(0.3)
    ours = stage1_loss(model, ids, labels, beta=0.1)
    ours.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    naive = _naive_stage1(model, ids, labels, beta=0.1)
    naive.backward()
    torch.testing.assert_close(ours.loss, naive, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert ours.num_tokens == int((labels != IGNORE_INDEX).sum())
    assert ours.exit_probs_mean.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_stage1_never_holds_all_step_logits():
    """Per-step CE runs under checkpointing: no [batch, seq, vocab] tensor is saved for backward."""
    ids, labels = _batch(seq=16)
    model = LoopLM(CONFIG)
    saved_vocab_tensors = []

    def pack(tensor):
        if tensor.dim() >= 2 and tensor.shape[-1] == CONFIG.vocab_size and tensor.shape[0] != CONFIG.vocab_size:
            saved_vocab_tensors.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = stage1_loss(model, ids, labels, beta=0.05).loss
    assert saved_vocab_tensors == []
    loss.backward()  # and the recomputation in backward still gives gradients
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def _naive_stage2(model, ids, labels, k=50.0, gamma=0.005):
    out = model(ids)
    steps = len(out.logits)
    counted = labels != IGNORE_INDEX
    ce = torch.stack(
        [F.cross_entropy(out.logits[t][counted], labels[counted], reduction="none").detach() for t in range(steps)]
    )
    lam = torch.sigmoid(out.gate_logits[counted]).T  # [T, tokens]
    total = 0.0
    for t in range(1, steps):  # paper steps 2..T
        improvement = torch.clamp(ce[t - 1] - ce[t], min=0.0)
        w = torch.sigmoid(k * (improvement - gamma))
        bce = -(w * torch.log(1 - lam[t]) + (1 - w) * torch.log(lam[t]))
        total = total + bce.mean()
    return total / steps


def test_stage2_loss_equals_rederivation_and_touches_only_the_gate():
    ids, labels = _batch()
    model = LoopLM(CONFIG)
    ours = stage2_loss(model, ids, labels)
    torch.testing.assert_close(ours.loss, _naive_stage2(model, ids, labels).detach(), rtol=1e-5, atol=1e-6)

    ours.loss.backward()
    gate = set(map(id, gate_parameters(model)))
    for name, param in model.named_parameters():
        if id(param) in gate:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, f"{name} received a Stage II gradient"


def test_stage2_training_changes_no_lm_weight():
    ids, labels = _batch()
    model = LoopLM(CONFIG)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # AdamW over *all* parameters with weight decay: only parameters with a gradient may move.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        stage2_loss(model, ids, labels).loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if "early_exit_gate" in name:
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name


def test_labels_must_match_and_count_something():
    ids, labels = _batch()
    model = LoopLM(CONFIG)
    with pytest.raises(ValueError, match="shape"):
        stage1_loss(model, ids, labels[:, :-1], beta=0.05)
    with pytest.raises(ValueError, match="no token"):
        stage1_loss(model, ids, torch.full_like(labels, IGNORE_INDEX), beta=0.05)
