"""Loop-robust training options on the Megatron LoopLM against the single-process reference LoopLM.

For each option (reinject_embedding, the contraction term, the KV consistency term, and all three together) the
Megatron model loads the reference's Ouro HF checkpoint and runs one Stage I forward/backward on the same batch:
the loss, each term, the per-step CE and every gradient agree to rel 1e-5 (the tolerance of the other parity
tests), at TP=1 and at TP=2 with sequence parallelism (the probe cut to each rank's slice of the sequence, the
sums over a rank's part of h and of the KV heads all-reduced). Under pipeline parallelism, re-injection and a
per-step T run through the loop-as-virtual-chunks schedule and match the reference too. A re-injecting model
exports to Ouro HF and loads as the reference, and does not import silently into a model without re-injection.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from _mcore_spawn import run_ranks
from _mcore_workers import LOOP_ROBUST_OPTIONS, loop_robust_parity, loop_robust_single_process, pipeline_parity

from looplm.infra.configs import load_config
from looplm.pipelines.reference_train import TrainSettings, train
from looplm.pipelines.training.config import LoopSchedule, PretrainConfig
from looplm.pipelines.training.schedules import drawn_recurrent_steps, training_steps_at

ROOT = Path(__file__).resolve().parents[3]
TOLERANCE = 1e-5
OPTIONS = tuple(LOOP_ROBUST_OPTIONS)  # each option alone, all together, contraction under loop recompute


def _check(results: dict) -> None:
    for case, figures in results.items():
        assert figures["loss"] == pytest.approx(figures["ref_loss"], rel=TOLERANCE), case
        assert figures["max_grad_rel_err"] <= TOLERANCE, (case, figures["worst"], figures["max_grad_rel_err"])
        assert figures["ce_per_step"] == pytest.approx(figures["ref_ce_per_step"], rel=TOLERANCE), case
        weights = LOOP_ROBUST_OPTIONS[case[-1]]
        for name, (mine, reference) in figures["terms"].items():
            switched_on = weights.get(name, weights.get(f"{name}_penalty", 0)) > 0
            assert (reference is not None) == switched_on, (case, name)
            assert (mine is not None) == switched_on, (case, name)
            if switched_on:
                assert reference > 0, (case, name)
                assert mine == pytest.approx(reference, rel=TOLERANCE), (case, name)


def test_loop_robust_options_on_one_rank_match_reference_round_trip_and_train(tmp_path):
    """One process: (1) each option's loss, terms and gradients match the reference; (2) a re-injecting model
    exports to Ouro HF, loads as the reference, and refuses to import into a model without re-injection; (3) the
    Megatron trainer runs every option at once, draws the T that the reference trainer draws for its seed, logs
    both terms, and exports a config.json that says reinject_embedding."""
    steps, seed = 4, 5
    overrides = [
        "data.seq_len=16",
        "data.micro_batch_size=2",
        "data.global_batch_size=4",
        f"train.steps={steps}",
        f"train.seed={seed}",
        "train.log_interval=1",
        "train.checkpoint_interval=100",
        "loop.random_steps=[1, 4]",
        "loop.contraction_penalty=0.1",
        "loop.kv_consistency=0.1",
        "model.overrides.reinject_embedding=true",
    ]
    config = load_config(PretrainConfig, ROOT / "configs" / "train-tiny-cpu.yaml", overrides)
    (out,) = run_ranks(
        loop_robust_single_process, 1, tmp_path, root=str(tmp_path), options=list(OPTIONS), config=config
    )
    assert len(out["parity"]) == len(OPTIONS)
    _check(out["parity"])
    trip = out["round_trip"]
    assert trip["config"].reinject_embedding is True
    assert trip["tensors_equal"]
    assert trip["loss"] == pytest.approx(trip["ref_loss"], rel=TOLERANCE)
    assert "reinject_embedding=True" in trip["mismatch_error"], trip["mismatch_error"]
    trained = [r for r in out["records"] if "loss" in r]
    reference_draws = [drawn_recurrent_steps(step, 1, 4, seed) for step in range(steps)]
    assert [r["recurrent_steps"] for r in trained] == reference_draws
    assert all(r["contraction"] > 0 and r["kv_consistency"] >= 0 for r in trained)
    assert out["exported"]["reinject_embedding"] is True


@pytest.mark.slow
def test_loop_robust_options_match_reference_under_tensor_and_sequence_parallelism(tmp_path):
    for rank_results in run_ranks(loop_robust_parity, 2, tmp_path, cases=[(2, True, "all")], root=str(tmp_path)):
        _check(rank_results)


@pytest.mark.slow
def test_reinjection_and_a_drawn_loop_count_match_reference_through_the_pipeline(tmp_path):
    """PP=2 with re-injection (the first stage re-embeds at the start of each loop) at T = 3, a T that
    loop.random_steps can draw for a step (the step makes T virtual chunks, whatever T is); 2 micro-batches of 4."""
    results = run_ranks(
        pipeline_parity, 2, tmp_path, cases=[(1, 2, False)], root=str(tmp_path), steps=3, reinject=True, micro_batch=4
    )
    for rank_results in results:
        for case, figures in rank_results.items():
            assert figures["loss"] == pytest.approx(figures["ref_loss"], rel=TOLERANCE), case
            assert figures["max_grad_rel_err"] <= TOLERANCE, (case, figures["worst"], figures["max_grad_rel_err"])
            assert figures["ce_per_step"] == pytest.approx(figures["ref_ce_per_step"], rel=TOLERANCE), case


def test_loop_robust_config_fields_are_validated_with_errors_naming_the_field():
    tiny = ROOT / "configs" / "train-tiny-cpu.yaml"
    pipeline = ["parallel.pipeline_parallel=2", "data.micro_batch_size=4", "data.global_batch_size=8"]
    bad = {
        "loop.random_steps [lo, hi] needs 1 <= lo <= hi": ["loop.random_steps=[3, 2]"],
        "loop.contraction_penalty must be a finite weight": ["loop.contraction_penalty=-1.0"],
        "loop.kv_consistency does not run under pipeline parallelism": [*pipeline, "loop.kv_consistency=1.0"],
        "loop.contraction_penalty does not run under pipeline": [*pipeline, "loop.contraction_penalty=1.0"],
        "loop.contraction_penalty is a Stage I term": ["train.objective=stage2", "loop.contraction_penalty=1.0"],
        r"loop.kv_consistency needs parallel.recompute='none'": ["parallel.recompute=loop", "loop.kv_consistency=1.0"],
    }
    for message, overrides in bad.items():
        with pytest.raises(ValueError, match=re.escape(message).replace(r"\'", "'")):
            load_config(PretrainConfig, tiny, overrides)
    # What does run under pipeline parallelism: a drawn T per step and re-injection.
    accepted = load_config(
        PretrainConfig, tiny, [*pipeline, "loop.random_steps=[2, 5]", "model.overrides.reinject_embedding=true"]
    )
    assert accepted.loop.random_steps == (2, 5) and accepted.model.build().reinject_embedding
    with pytest.raises(ValueError, match="random_steps"):
        TrainSettings(random_steps=(0, 2))
    with pytest.raises(ValueError, match="kv_consistency is a Stage I term"):
        TrainSettings(stage="stage2", kv_consistency=1.0)


def test_both_trainers_draw_the_same_loop_counts_and_the_reference_trainer_logs_the_terms():
    """The reference trainer's T per step is the Megatron trainer's (schedules.training_steps_at, what
    trainer.train_on_rank runs) for the same seed; the draw covers lo..hi; the terms are logged."""
    import torch

    from looplm.model import LoopLM, LoopLMConfig

    config = LoopLMConfig.preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2)
    torch.manual_seed(0)
    rows = torch.randint(0, 64, (16, 17))
    settings = TrainSettings(
        steps=4, batch_size=2, log_every=1, seed=3, random_steps=(1, 4), contraction_penalty=0.1, kv_consistency=0.1
    )
    records = train(LoopLM(config), rows, settings)
    drawn = [training_steps_at(step, LoopSchedule(random_steps=(1, 4)), 3) for step in range(4)]
    assert [r["recurrent_steps"] for r in records] == drawn
    assert all(math.isfinite(r["contraction"]) and r["contraction"] > 0 for r in records)
    assert all(r["kv_consistency"] >= 0 for r in records)
    assert {r["kv_consistency"] > 0 for r in records} == {T > 1 for T in drawn}
    many = [training_steps_at(step, LoopSchedule(random_steps=(2, 5)), 0) for step in range(400)]
    assert set(many) == {2, 3, 4, 5} and min(many.count(t) for t in range(2, 6)) > 60
    assert many != [training_steps_at(step, LoopSchedule(random_steps=(2, 5)), 1) for step in range(400)]
