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

import pytest
from _mcore_spawn import run_ranks
from _mcore_workers import loop_robust_parity, loop_robust_single_process, pipeline_parity

TOLERANCE = 1e-5
OPTIONS = ("reinject", "contraction", "kv_consistency", "all")


def _check(results: dict) -> None:
    for case, figures in results.items():
        assert figures["loss"] == pytest.approx(figures["ref_loss"], rel=TOLERANCE), case
        assert figures["max_grad_rel_err"] <= TOLERANCE, (case, figures["worst"], figures["max_grad_rel_err"])
        assert figures["ce_per_step"] == pytest.approx(figures["ref_ce_per_step"], rel=TOLERANCE), case
        option = case[-1]
        for name, (mine, reference) in figures["terms"].items():
            switched_on = option == "all" or option == name
            assert (reference is not None) == switched_on, (case, name)
            assert (mine is not None) == switched_on, (case, name)
            if switched_on:
                assert reference > 0, (case, name)
                assert mine == pytest.approx(reference, rel=TOLERANCE), (case, name)


def test_each_loop_robust_option_matches_reference_and_a_reinjecting_model_round_trips_through_ouro_hf(tmp_path):
    (out,) = run_ranks(loop_robust_single_process, 1, tmp_path, root=str(tmp_path), options=list(OPTIONS))
    assert len(out["parity"]) == len(OPTIONS)
    _check(out["parity"])
    trip = out["round_trip"]
    assert trip["config"].reinject_embedding is True
    assert trip["tensors_equal"]
    assert trip["loss"] == pytest.approx(trip["ref_loss"], rel=TOLERANCE)
    assert "reinject_embedding=True" in trip["mismatch_error"], trip["mismatch_error"]


@pytest.mark.slow
def test_loop_robust_options_match_reference_under_tensor_and_sequence_parallelism(tmp_path):
    for rank_results in run_ranks(loop_robust_parity, 2, tmp_path, cases=[(2, True, "all")], root=str(tmp_path)):
        _check(rank_results)


@pytest.mark.slow
def test_reinjection_and_a_drawn_loop_count_match_reference_through_the_pipeline(tmp_path):
    """PP=2 with re-injection (the first stage re-embeds at the start of each loop) at T = 5, a T that
    loop.random_steps can draw for a step (the step makes T virtual chunks, whatever T is); 2 micro-batches of 4."""
    results = run_ranks(
        pipeline_parity, 2, tmp_path, cases=[(1, 2, False)], root=str(tmp_path), steps=5, reinject=True, micro_batch=4
    )
    for rank_results in results:
        for case, figures in rank_results.items():
            assert figures["loss"] == pytest.approx(figures["ref_loss"], rel=TOLERANCE), case
            assert figures["max_grad_rel_err"] <= TOLERANCE, (case, figures["worst"], figures["max_grad_rel_err"])
            assert figures["ce_per_step"] == pytest.approx(figures["ref_ce_per_step"], rel=TOLERANCE), case
