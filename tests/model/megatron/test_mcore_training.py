"""The Megatron pretraining loop on real gloo groups: exact kill-and-resume, loss falls, non-finite abort."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _mcore_spawn import run_ranks
from _mcore_workers import train, train_expecting_error, train_with_poisoned_steps, train_with_uneven_labels

from looplm.infra.configs import load_config
from looplm.model import LoopLM, LoopLMConfig
from looplm.pipelines.training.config import OptimConfig, PretrainConfig
from looplm.pipelines.training.schedules import beta_at, global_batch_sizes, lr_at, recurrent_steps_at

ROOT = Path(__file__).resolve().parents[3]
TINY = str(ROOT / "configs" / "train-tiny-cpu.yaml")


def _config(*overrides: str) -> PretrainConfig:
    small = ["data.seq_len=32", "data.micro_batch_size=4", "data.global_batch_size=8", "train.log_interval=1"]
    return load_config(PretrainConfig, TINY, small + list(overrides))


def test_schedules():
    optim = OptimConfig(lr=1.0, min_lr=0.1, schedule="wsd", warmup_steps=10, decay_steps=10)
    assert lr_at(0, optim, 100) == pytest.approx(0.1) and lr_at(9, optim, 100) == 1.0
    assert lr_at(50, optim, 100) == 1.0 and lr_at(99, optim, 100) == pytest.approx(0.1)
    cosine = OptimConfig(lr=1.0, min_lr=0.1, schedule="cosine", warmup_steps=0)
    assert lr_at(0, cosine, 101) == 1.0 and lr_at(50, cosine, 101) == pytest.approx(0.55)
    assert lr_at(100, cosine, 101) == pytest.approx(0.1)
    constant = OptimConfig(lr=1.0, schedule="warmup_constant", warmup_steps=4)
    assert [lr_at(s, constant, 10) for s in (0, 3, 9)] == [0.25, 1.0, 1.0]
    config = _config()
    assert [recurrent_steps_at(s, config.loop) for s in (0, 19, 20, 99)] == [8, 8, 4, 4]
    assert [beta_at(s, config.loop) for s in (0, 20)] == [0.1, 0.05]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("train-*.yaml")), ids=lambda p: p.name)
def test_shipped_training_configs_load(path):
    config = load_config(PretrainConfig, path)
    assert config.train.steps >= 1 and config.parallel.transformer_impl in ("local", "transformer_engine")


def test_ouro_recipe_configs_follow_the_paper():
    stage1a = load_config(PretrainConfig, ROOT / "configs" / "train-ouro-1.4b-stage1a.yaml")
    stage1b = load_config(PretrainConfig, ROOT / "configs" / "train-ouro-1.4b-stage1b.yaml")
    assert (stage1a.loop.recurrent_steps, stage1a.loop.beta) == (((0, 8),), ((0, 0.1),))
    assert (stage1b.loop.recurrent_steps, stage1b.loop.beta) == (((0, 4),), ((0, 0.05),))
    assert stage1a.data.global_batch_size * stage1a.data.seq_len == 8 * 1024 * 1024
    assert stage1a.optim.betas == (0.9, 0.95) and stage1a.optim.weight_decay == 0.1 and stage1a.optim.grad_clip == 1.0
    start, _, ramp_samples = stage1a.data.rampup_batch_size  # 4M -> 8M tokens
    assert start * stage1a.data.seq_len == 4 * 1024 * 1024
    sizes = global_batch_sizes(stage1a.data, stage1a.launch.data_parallel, stage1a.train.steps)
    assert sizes[0] == start and sizes[-1] == stage1a.data.global_batch_size
    assert sum(sizes) * stage1a.data.seq_len == pytest.approx(3e12, rel=1e-4)  # Stage 1a is 3T tokens


def test_ouro_recipe_stages_chain():
    """Each stage starts from the previous stage's HF export (the default output of `looplm train`), the 2.6B
    line from the upcycled 48-layer Stage 1a; the model config matches the stage (T, RoPE base, sequence)."""
    chains = {
        "1.4b": ["stage1a", "stage1b", "stage2", "stage3", "stage4"],
        "2.6b": ["stage1b", "stage2", "stage3", "stage4"],
    }
    rope = {"stage1a": 10_000.0, "stage1b": 10_000.0, "stage2": 40_000.0, "stage3": 1_000_000.0, "stage4": 1_000_000.0}
    seq = {"stage1a": 4096, "stage1b": 4096, "stage2": 16384, "stage3": 65536, "stage4": 32768}
    for size, stages in chains.items():
        previous = "runs/train-ouro-1.4b-stage1a-upcycled-48l/hf" if size == "2.6b" else None
        for stage in stages:
            config = load_config(PretrainConfig, ROOT / "configs" / f"train-ouro-{size}-{stage}.yaml")
            model = config.model.build()
            assert config.train.init_from_hf == previous, (size, stage)
            assert model.rope_theta == rope[stage] and config.data.seq_len == seq[stage], (size, stage)
            assert model.max_position_embeddings >= config.data.seq_len
            assert model.num_hidden_layers == {"1.4b": 24, "2.6b": 48}[size]
            assert config.data.global_batch_size * config.data.seq_len == 8 * 1024 * 1024
            previous = f"runs/train-{config.name}/hf"


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="global_batch_size"):
        _config("data.global_batch_size=6")
    with pytest.raises(ValueError, match="recurrent_steps"):
        _config("loop.recurrent_steps=[[5, 4]]")
    with pytest.raises(ValueError, match="objective"):
        _config("train.objective=stage3")


def test_batch_ramp_follows_megatron_lm_rampup_batch_size():
    """[start 2, increment 2, over 12 samples] to 8: three increments, one per 12/3 = 4 samples consumed."""
    data = _config("data.rampup_batch_size=[2, 2, 12]", "data.micro_batch_size=2").data
    # consumed before each step: 0, 2, 4, 8, 14 (> 12: ramp over), 22 -> batch 2 + 2 * int(consumed / 4), then 8
    assert global_batch_sizes(data, data_parallel=1, steps=7) == [2, 2, 4, 6, 8, 8, 8]
    assert global_batch_sizes(_config().data, data_parallel=1, steps=3) == [8, 8, 8]
    with pytest.raises(ValueError, match="must be multiples of micro_batch_size x launch.data_parallel"):
        _config("data.rampup_batch_size=[2, 2, 12]", "data.micro_batch_size=4")
    with pytest.raises(ValueError, match="is not a multiple of the increment"):
        _config("data.rampup_batch_size=[2, 4, 12]", "data.micro_batch_size=2")


def test_batch_ramp_trains_the_same_on_any_layout_and_resumes_mid_ramp(tmp_path):
    """A ramped run on one rank, on DP=2, and stopped after step 4 (checkpoint: step 3) then resumed mid-ramp:
    the same losses. Its first step sees exactly the first `start` samples, like a run of that batch size."""
    ramp = ["data.rampup_batch_size=[2, 2, 12]", "train.steps=6", "train.checkpoint_interval=3"]
    single = _config(*ramp, "data.micro_batch_size=2")
    first_batch = _config("data.global_batch_size=2", "data.micro_batch_size=2", "train.steps=1")
    resumed = str(tmp_path / "resumed")
    runs = [(single, str(tmp_path / "one"), None), (first_batch, str(tmp_path / "first"), None)]
    runs += [(single, resumed, 4), (single, resumed, None)]
    straight, first, _, resumed_records = run_ranks(train, 1, tmp_path, runs=runs)[0]
    (two_ranks,) = run_ranks(
        train,
        2,
        tmp_path,
        runs=[(_config(*ramp, "data.micro_batch_size=1", "launch.data_parallel=2"), str(tmp_path / "two"), None)],
    )[0]
    logged = [r for r in straight if "loss" in r]
    assert [r["global_batch_size"] for r in logged] == [2, 2, 4, 6, 8, 8]
    assert [r["tokens_seen"] for r in logged] == [32 * n for n in (2, 4, 8, 14, 22, 30)]
    assert logged[0]["loss"] == pytest.approx(first[0]["loss"], rel=1e-6)
    for record in (r for r in two_ranks if "loss" in r):
        assert record["loss"] == pytest.approx(logged[record["step"] - 1]["loss"], rel=1e-5), record["step"]
    assert [r["step"] for r in resumed_records if "loss" in r] == [4, 5, 6]
    for record in (r for r in resumed_records if "loss" in r):
        assert record["loss"] == pytest.approx(logged[record["step"] - 1]["loss"], rel=1e-6, abs=1e-6)


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_losses(tmp_path):
    """TP=2 with SP: 20 steps straight vs. 13 steps, a 'crash' (latest checkpoint: step 8), then a resume, on the
    same layout (exact) and on TP=1 x DP=2 (the checkpoint, optimizer moments included, resharded)."""
    overrides = [
        "train.steps=20",
        "train.checkpoint_interval=8",
        "data.global_batch_size=4",
        "loop.recurrent_steps=[[0, 3], [10, 2]]",
        "loop.beta=[[0, 0.1], [10, 0.05]]",
    ]
    config = _config(*overrides, "parallel.tensor_parallel=2", "parallel.sequence_parallel=true")
    relayout = _config(*overrides, "launch.data_parallel=2", "data.micro_batch_size=2")
    resumed, moved = str(tmp_path / "resumed"), str(tmp_path / "moved")
    runs = [(config, str(tmp_path / "straight"), None), (config, resumed, 13), (config, moved, 13)]
    runs += [(config, resumed, None), (relayout, moved, None)]
    straight, crashed, _, resumed, moved = run_ranks(train, 2, tmp_path, runs=runs)[0]
    losses = {r["step"]: r["loss"] for r in straight if "loss" in r}
    assert sorted(losses) == list(range(1, 21))
    assert [r["step"] for r in crashed] == list(range(1, 14))
    assert [r["step"] for r in resumed if "loss" in r] == list(range(9, 21))
    for record in crashed + [r for r in resumed if "loss" in r]:
        assert record["loss"] == pytest.approx(losses[record["step"]], rel=1e-6, abs=1e-6), record["step"]
    assert straight[-1]["valid_loss"] == pytest.approx(resumed[-1]["valid_loss"], rel=1e-6)
    assert [r["step"] for r in moved if "loss" in r] == list(range(9, 21))
    for record in (r for r in moved if "loss" in r):
        assert record["loss"] == pytest.approx(losses[record["step"]], rel=1e-5), record["step"]


@pytest.mark.slow
def test_stage1_loss_falls_then_stage2_trains_the_gate_alone(tmp_path):
    """DP=2: Stage I from scratch, its Ouro HF export, then Stage II from that export with the LM frozen."""
    stage1 = _config("train.steps=20", "train.checkpoint_interval=20", "train.log_interval=4", "launch.data_parallel=2")
    stage2 = _config(
        "train.steps=4",
        "train.objective=stage2",
        "loop.recurrent_steps=[[0, 4]]",
        "launch.data_parallel=2",
        f"train.init_from_hf={tmp_path / 's1' / 'hf'}",
    )
    runs = [(stage1, str(tmp_path / "s1"), None), (stage2, str(tmp_path / "s2"), None)]
    records, gate = run_ranks(train, 2, tmp_path, runs=runs)[0]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses
    assert records[-1]["valid_loss"] < math.log(stage1.model.build().vocab_size) - 0.5
    assert all(math.isfinite(r["loss"]) for r in gate if "loss" in r)
    before = LoopLM.from_pretrained(tmp_path / "s1" / "hf").state_dict()
    after = LoopLM.from_pretrained(tmp_path / "s2" / "hf").state_dict()
    moved = sorted(name for name in before if not torch.equal(before[name], after[name]))
    assert moved == ["model.early_exit_gate.bias", "model.early_exit_gate.weight"]


@pytest.mark.slow
def test_the_recipe_in_miniature_stage1a_upcycle_stage1b(tmp_path):
    """The 2.6B line at toy scale: Stage 1a (2 layers, T=4), `upcycle` to 4 layers, Stage 1b at T=2 from it.
    The upcycled model starts far below an untrained model's loss: what Stage 1a learned is carried over."""
    from looplm.model.upcycle import upcycle_layers

    common = ("train.checkpoint_interval=100", "train.log_interval=1", "optim.warmup_steps=2")
    stage1a = _config(*common, "train.steps=20", "loop.recurrent_steps=[[0, 4]]")
    run_ranks(train, 1, tmp_path, runs=[(stage1a, str(tmp_path / "1a"), None)])
    upcycle_layers(tmp_path / "1a" / "hf", tmp_path / "1a-4l", factor=2)
    stage1b = [
        "train.steps=4",
        "loop.recurrent_steps=[[0, 2]]",
        "model.overrides={num_hidden_layers: 4}",
        f"train.init_from_hf={tmp_path / '1a-4l'}",
    ]
    scratch = _config(*common, *stage1b[:3])
    records, fresh = run_ranks(
        train,
        1,
        tmp_path,
        runs=[(_config(*common, *stage1b), str(tmp_path / "1b"), None), (scratch, str(tmp_path / "0"), None)],
    )[0]
    upcycled_first = next(r["loss"] for r in records if "loss" in r)
    scratch_first = next(r["loss"] for r in fresh if "loss" in r)
    assert LoopLM.from_pretrained(tmp_path / "1b" / "hf").config.num_hidden_layers == 4
    assert upcycled_first < scratch_first - 0.5, (upcycled_first, scratch_first)
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)


def test_non_finite_losses_are_skipped_then_abort(tmp_path):
    reference = LoopLM(LoopLMConfig.preset("tiny"))
    with torch.no_grad():
        reference.model.norm.weight.fill_(float("nan"))
    reference.save_pretrained(tmp_path / "nan-model")
    config = _config("train.steps=10", f"train.init_from_hf={tmp_path / 'nan-model'}", "train.max_nonfinite_in_a_row=3")
    (message,) = run_ranks(train_expecting_error, 1, tmp_path, config=config, output=str(tmp_path / "run"))
    assert message.startswith("NonFiniteLossError: 3 steps in a row had a non-finite loss"), message


@pytest.mark.parametrize("implementation", ["torch", "megatron"])
def test_a_non_finite_step_is_skipped_counted_and_training_goes_on(tmp_path, implementation):
    """Step 3's loss is NaN: no update happens there, the skip is counted, and the run finishes finite."""
    config = _config(
        "train.steps=6",
        "train.checkpoint_interval=6",
        "train.max_nonfinite_in_a_row=2",
        f"optim.implementation={implementation}",
    )
    clean, poisoned = run_ranks(
        train_with_poisoned_steps, 1, tmp_path, config=config, output=str(tmp_path / "run"), poisoned=[3]
    )[0]
    clean_steps = {r["step"]: r for r in clean if "loss" in r}
    logged = {r["step"]: r for r in poisoned if "loss" in r}
    assert sorted(logged) == [1, 2, 3, 5, 6]  # step 4 (0-based 3) skipped: nothing logged for it
    for step in (1, 2, 3):  # identical until the poisoned step
        assert logged[step]["loss"] == clean_steps[step]["loss"]
    assert logged[6]["skipped_steps"] == 1 and clean_steps[6]["skipped_steps"] == 0
    # Had the NaN step updated the weights, every later loss would be NaN; having skipped an update, the run
    # is on a different (finite) trajectory from the clean one.
    assert all(math.isfinite(r["loss"]) for r in logged.values())
    assert logged[5]["loss"] != clean_steps[5]["loss"]


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    config = _config("train.steps=6", "train.checkpoint_interval=2", "train.keep_checkpoints=2")
    run_ranks(train, 1, tmp_path, runs=[(config, str(tmp_path / "run"), None)])
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000004", "step_00000006"]
    assert (root / "latest").read_text().strip() == "step_00000006"
    with pytest.raises(ValueError, match="keep_checkpoints"):
        _config("train.keep_checkpoints=0")


def test_the_loss_is_the_mean_over_all_counted_tokens_whatever_the_layout(tmp_path):
    """With uneven token counts, one process with the whole batch and DP=2 with half each train identically:
    the loss is the global token mean, not a mean of per-rank means."""
    overrides = ["train.steps=3", "train.checkpoint_interval=3", "data.global_batch_size=8"]
    whole = _config(*overrides, "data.micro_batch_size=8")
    split = _config(*overrides, "data.micro_batch_size=4", "launch.data_parallel=2")
    (one,) = run_ranks(train_with_uneven_labels, 1, tmp_path, config=whole, output=str(tmp_path / "one"))
    two = run_ranks(train_with_uneven_labels, 2, tmp_path, config=split, output=str(tmp_path / "two"))[0]
    losses_one = [r["loss"] for r in one if "loss" in r]
    losses_two = [r["loss"] for r in two if "loss" in r]
    assert len(losses_one) == 3
    assert losses_two == pytest.approx(losses_one, rel=1e-5)
