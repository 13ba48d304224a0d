import pytest
import torch

from looplm.model import LoopLM, LoopLMConfig
from looplm.model.tokenizer import train_byte_level_bpe
from looplm.pipelines import synthetic
from looplm.pipelines.reference_train import TrainSettings, lr_at, pack_documents, per_step_validation, train


def test_pack_documents_keeps_every_token_in_order():
    docs = [[5, 6, 7], [8], [9, 10, 11, 12]]
    rows = pack_documents(docs, end_of_document=0, seq_len=3)
    assert rows.tolist() == [[5, 6, 7, 0], [8, 0, 9, 10]]  # the 3-token tail [11, 12, 0] does not fill a row
    with pytest.raises(ValueError, match="do not fill one sequence"):
        pack_documents([[1]], end_of_document=0, seq_len=8)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    settings = TrainSettings(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, settings) == pytest.approx(0.1)
    assert lr_at(9, settings) == pytest.approx(1.0)
    assert lr_at(99, settings) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, settings) >= lr_at(s + 1, settings) for s in range(10, 99))


def test_stage1_training_lowers_validation_loss_at_every_step():
    texts = synthetic.biographies(60, seed=3, exposures=3)
    tokenizer = train_byte_level_bpe(texts, 512)
    rows = pack_documents((e.ids for e in tokenizer.encode_batch(texts)), 0, 64)
    valid, train_rows = rows[:8], rows[8:]
    model = LoopLM(LoopLMConfig.preset("tiny", vocab_size=512))
    before = per_step_validation(model, valid)
    history = train(model, train_rows, TrainSettings(steps=60, batch_size=8, lr=3e-3, warmup_steps=5))
    after = per_step_validation(model, valid)
    assert torch.all(after < before - 1.0), (before, after)
    assert history[-1]["loss"] < history[0]["loss"]
    assert {"ce_step_4", "exit_prob_step_1", "grad_norm", "lr"} <= set(history[-1])


def test_non_finite_losses_abort_after_k_in_a_row():
    model = LoopLM(LoopLMConfig.preset("tiny", vocab_size=512))
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    rows = torch.randint(0, 512, (8, 17))
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        train(model, rows, TrainSettings(steps=10, batch_size=2, max_bad_steps=3))
