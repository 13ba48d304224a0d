"""Pipeline parallelism around the loop on real gloo groups: every micro-batch travels the pipeline T times.

Parity: one Stage I step through the trainer's schedule step (megatron's interleaved schedule, loop t = virtual
chunk t) against the single-process reference LoopLM: loss, per-step CE and every gradient to rel 1e-5, at
PP=2 and PP=4 x DP=2 with T=4, and TP=2 x PP=2 x DP=2 (with and without sequence parallelism). The naive
pipeline that loops each stage's own layers is a different function, which the same check rejects.

Training: PP=2 trains like PP=1 (T changing mid-run, batch ramp; the same losses and gradient norms, with torch
AdamW and with megatron-core's DistributedOptimizer), resumes exactly after a crash, and its checkpoints reshard
to PP=1 and back (the model alone bitwise, training runs to rel 1e-5).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _mcore_spawn import run_ranks
from _mcore_workers import pipeline_parity, pipeline_training

from looplm.infra.configs import load_config
from looplm.model import LoopLM
from looplm.pipelines.training.config import PretrainConfig

ROOT = Path(__file__).resolve().parents[3]
TOLERANCE = 1e-5


def _check(results: dict) -> None:
    for case, figures in results.items():
        assert figures["grad_names"], case
        assert figures["tokens"] == figures["ref_tokens"], case
        assert figures["loss"] == pytest.approx(figures["ref_loss"], rel=TOLERANCE), case
        assert figures["max_grad_rel_err"] <= TOLERANCE, (case, figures["worst"], figures["max_grad_rel_err"])
        if figures["ce_per_step"] is not None:
            assert figures["ce_per_step"] == pytest.approx(figures["ref_ce_per_step"], rel=TOLERANCE), case


@pytest.mark.slow
def test_pipeline_parallel_loop_matches_reference_and_the_naive_per_stage_loop_does_not(tmp_path):
    """PP=2, T=4, 8 micro-batches: the loop around the pipeline is the reference's function; looping each
    stage's own layers (L0..L1)x4 -> (L2..L3)x4 is not, by far more than the tolerance."""
    results = run_ranks(pipeline_parity, 2, tmp_path, cases=[(1, 2, False)], root=str(tmp_path))
    for rank_results in results:
        _check(rank_results)
    figures = results[0][(1, 2, False)]
    assert abs(figures["naive_loss"] - figures["ref_loss"]) > 100 * TOLERANCE * figures["ref_loss"], figures


@pytest.mark.slow
def test_four_stages_and_tensor_by_pipeline_by_data_parallel_match_reference(tmp_path):
    """8 ranks (memory allows it; ~0.4 GB each): PP=4 x DP=2 (T=4: a micro-batch crosses 16 stage boundaries),
    TP=2 x PP=2 x DP=2, and the same with sequence parallelism (h is a slice of the sequence, the accumulators
    travel whole). Each DP rank runs 4 micro-batches; gradients are summed over DP and divided by the global
    token count."""
    cases = [(1, 4, False), (2, 2, False), (2, 2, True)]
    for rank_results in run_ranks(pipeline_parity, 8, tmp_path, cases=cases, root=str(tmp_path)):
        _check(rank_results)


def _losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
def test_pipeline_training_matches_pp1_resumes_exactly_and_reshards(tmp_path):
    """Both layouts start from one Ouro HF checkpoint (a fresh init draws per stage, so it depends on the layout)."""
    LoopLM(load_config(PretrainConfig, ROOT / "configs" / "train-tiny-cpu.yaml").model.build()).save_pretrained(
        tmp_path / "init"
    )
    common = [
        f"train.init_from_hf={tmp_path / 'init'}",
        "data.seq_len=32",
        "data.micro_batch_size=2",
        "data.global_batch_size=8",
        "data.rampup_batch_size=[4, 4, 8]",  # 4 then 8 sequences: 2 then 4 micro-batches on a PP=2 stage
        "loop.recurrent_steps=[[0, 4], [3, 2]]",  # T changes mid-run: 4 chunks per stage, then 2
        "train.steps=6",
        "train.checkpoint_interval=3",
        "train.log_interval=1",
    ]
    tiny = ROOT / "configs" / "train-tiny-cpu.yaml"
    configs = {
        "pp2": load_config(PretrainConfig, tiny, [*common, "parallel.pipeline_parallel=2"]),
        "pp1": load_config(PretrainConfig, tiny, [*common, "launch.data_parallel=2", "data.micro_batch_size=1"]),
        "pp2_megatron": load_config(
            PretrainConfig, tiny, [*common, "parallel.pipeline_parallel=2", "optim.implementation=megatron"]
        ),
    }
    (out, _) = run_ranks(pipeline_training, 2, tmp_path, root=str(tmp_path), configs=configs, crash_at=4)
    pp2, pp1 = _losses(out["pp2"]), _losses(out["pp1"])
    assert sorted(pp2) == list(range(1, 7))
    assert [r["recurrent_steps"] for r in out["pp2"] if "loss" in r] == [4, 4, 4, 2, 2, 2]
    assert [r["global_batch_size"] for r in out["pp2"] if "loss" in r][:3] == [4, 4, 8]
    for step, loss in pp1.items():
        assert pp2[step] == pytest.approx(loss, rel=TOLERANCE), step
    # The gradient norm covers both stages (and equals megatron's optimizer's own, over its groups).
    norms = {name: [r["grad_norm"] for r in out[name] if "loss" in r] for name in ("pp1", "pp2", "pp2_megatron")}
    assert norms["pp2"] == pytest.approx(norms["pp1"], rel=TOLERANCE)
    assert norms["pp2_megatron"] == pytest.approx(norms["pp2"], rel=TOLERANCE)
    assert _losses(out["pp2_megatron"]) == pytest.approx(pp2, rel=TOLERANCE)
    assert out["pp2"][-1]["valid_loss"] == pytest.approx(out["pp1"][-1]["valid_loss"], rel=TOLERANCE)
    # The HF export from the PP=2 layout is the PP=1 run's model.
    left = LoopLM.from_pretrained(tmp_path / "pp2" / "hf").state_dict()
    right = LoopLM.from_pretrained(tmp_path / "pp1" / "hf").state_dict()
    assert max(((left[n] - right[n]).norm() / right[n].norm()).item() for n in right) < TOLERANCE
    # Crash after step 4 (latest checkpoint: step 3), resume at PP=2: exact; at PP=1, and PP=1 -> PP=2: resharded.
    assert sorted(_losses(out["pp2_crashed"])) == [1, 2, 3, 4]
    assert sorted(_losses(out["pp2_resumed"])) == [4, 5, 6]
    for step, loss in _losses(out["pp2_resumed"]).items():
        assert loss == pytest.approx(pp2[step], rel=1e-6, abs=1e-6), step
    for name in ("pp2_moved_to_pp1", "pp1_moved_to_pp2"):
        assert sorted(_losses(out[name])) == [4, 5, 6], name
        for step, loss in _losses(out[name]).items():
            assert loss == pytest.approx(pp2[step], rel=TOLERANCE), (name, step)
    assert out["pp1_differs_before_load"]
    assert out["pp2_to_pp1_exact"] and out["pp1_to_pp2_exact"]
