"""FP8 on the looped blocks (model/megatron/fp8.py): real e4m3/e5m2 GEMMs on CPU, the recipes, where FP8 is used
and where it is refused.

The GEMM tests compare against an independent computation: the operands quantised with the same scales,
dequantised, and multiplied in fp32 by torch.matmul. The only freedom left is the order of fp32 accumulation,
so the bound is the classic one for two dot products of length K summed in different orders:
|a - b| <= 2 * K * u * sum_k |x_k w_k| with u = 2^-24 (each side within gamma_K of the exact sum). A GEMM that
skipped quantisation, used another scale or another fp8 format misses that bound by orders of magnitude (checked).
"""

from __future__ import annotations

import math

import pytest
import torch
from _mcore_spawn import run_ranks

from looplm.model import LoopLMConfig
from looplm.model.config import ConfigError
from looplm.model.megatron.config import ParallelConfig

U32 = 2.0**-24
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _dequantised(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x quantised at `scale` (saturating) and brought back to fp32: the independent reference's operand."""
    limit = torch.finfo(dtype).max
    inverse = torch.tensor(scale, dtype=torch.float32).reciprocal()
    return (x.float() * scale).clamp(-limit, limit).to(dtype).float() * inverse


def _current_scale(x: torch.Tensor, dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max / x.abs().max().item()


def _assert_gemm_equal(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """out == a @ b up to fp32 accumulation order (module docstring); returns the largest |out - a @ b|."""
    ref = a @ b
    bound = 2 * a.shape[1] * U32 * (a.abs() @ b.abs())
    diff = (out.float() - ref).abs()
    assert bool((diff <= bound).all()), f"max excess {(diff - bound).max().item():.3e}"
    return diff.max().item()


def test_torch_scaled_mm_runs_fp8_gemms_on_cpu_but_not_mx_block_scales():
    """The facts fp8.py is built on (torch 2.13 CPU): e4m3 x e4m3 and e5m2 x e4m3 with scalar scales run and equal
    the fp32 product of the dequantised operands; MX block scales (e8m0 per 32) are refused, hence no local MXFP8."""
    a, b = torch.randn(32, 64) * 3, torch.randn(64, 48) * 0.02
    for a_dtype in (E4M3, E5M2):
        a8, b8 = (a * 10).to(a_dtype), (b * 1000).to(E4M3)
        out = torch._scaled_mm(
            a8, b8.t().contiguous().t(), scale_a=torch.tensor(0.1), scale_b=torch.tensor(1e-3), out_dtype=torch.float32
        )
        _assert_gemm_equal(out, a8.float() * torch.tensor(0.1), b8.float() * torch.tensor(1e-3))
    mx_a, mx_b = torch.ones(32, 2, dtype=torch.float8_e8m0fnu), torch.ones(48, 2, dtype=torch.float8_e8m0fnu)
    with pytest.raises((RuntimeError, ValueError), match="Invalid scaling configuration"):
        torch._scaled_mm(a.to(E4M3), b.to(E4M3).t().contiguous().t(), scale_a=mx_a, scale_b=mx_b)


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_fp8_linear_forward_and_backward_match_dequantised_reference_gemms(fmt):
    from looplm.model.megatron.fp8 import FP8Recipe, FP8Scaling, fp8_linear

    grad_dtype = E5M2 if fmt == "hybrid" else E4M3
    x = (torch.randn(2, 24, 96) * 4).requires_grad_()  # [..., K]: the linear flattens leading dims
    w = (torch.randn(80, 96) * 0.02).requires_grad_()
    g = torch.randn(2, 24, 80) * 1e-4
    out = fp8_linear(x, w, FP8Scaling(FP8Recipe(format=fmt, recipe="tensorwise")))
    out.backward(g)

    xq = _dequantised(x.detach(), _current_scale(x, E4M3), E4M3).reshape(-1, 96)
    wq = _dequantised(w.detach(), _current_scale(w, E4M3), E4M3)
    gq = _dequantised(g, _current_scale(g, grad_dtype), grad_dtype).reshape(-1, 80)
    _assert_gemm_equal(out.detach().reshape(-1, 80), xq, wq.t())
    _assert_gemm_equal(x.grad.reshape(-1, 96), gq, wq)
    _assert_gemm_equal(w.grad, gq.t(), xq)
    # It is FP8, not fp32 in disguise: the high-precision product is far outside the bound.
    exact = x.detach().reshape(-1, 96) @ w.detach().t()
    assert (out.detach().reshape(-1, 80) - exact).abs().max() > 100 * 96 * U32 * exact.abs().max()


@pytest.mark.parametrize(("algo", "history_len"), [("max", 3), ("most_recent", 1)])
def test_delayed_scaling_quantises_each_call_with_the_scale_of_earlier_calls(algo, history_len):
    """T calls of one module feed one history: call k is scaled from the amaxes of calls k-1, k-2, ... (the first
    at scale 1), so a call whose range grew past its predecessors' saturates."""
    from looplm.model.megatron.fp8 import FP8Recipe, FP8Scaling, fp8_linear

    scaling = FP8Scaling(FP8Recipe(recipe="delayed", amax_history_len=history_len, amax_compute_algo=algo))
    w = torch.randn(32, 64) * 0.02
    amaxes = []
    for call, magnitude in enumerate([2.0, 0.5, 8.0, 1.0, 3.0]):
        x = torch.randn(16, 64) * magnitude
        earlier = amaxes[-history_len:]
        x_scale = 448.0 / (max(earlier) if algo == "max" else earlier[-1]) if earlier else 1.0
        w_scale = 1.0 if call == 0 else 448.0 / w.abs().max().item()
        out = fp8_linear(x, w, scaling)
        _assert_gemm_equal(out, _dequantised(x, x_scale, E4M3), _dequantised(w, w_scale, E4M3).t())
        amaxes.append(x.abs().max().item())


def test_config_errors_say_why_fp8_cannot_run():
    tiny = LoopLMConfig.preset("tiny")
    with pytest.raises(ConfigError, match="mxfp8.*transformer_impl='local'.*Blackwell"):
        ParallelConfig(fp8="hybrid", fp8_recipe="mxfp8")
    with pytest.raises(ConfigError, match="recompute='layer'.*amax history"):
        ParallelConfig(fp8="hybrid", fp8_recipe="delayed", recompute="layer")
    with pytest.raises(ConfigError, match="fp8 must be None or one of"):
        ParallelConfig(fp8="e5m2")
    with pytest.raises(ConfigError, match="fp8_recipe must be one of"):
        ParallelConfig(fp8="hybrid", fp8_recipe="blockwise")
    for impl in ("local", "transformer_engine"):  # megatron's TransformerConfig refuses it for either
        with pytest.raises(ConfigError, match="first_last_layers_bf16.*delayed"):
            ParallelConfig(fp8="hybrid", fp8_recipe="delayed", transformer_impl=impl, fp8_first_last_layers_bf16=True)
    # Keeping both of the tiny model's two layers out of FP8 would leave FP8 asked for and applied nowhere.
    with pytest.raises(ConfigError, match="no layer would run in FP8"):
        ParallelConfig(fp8="hybrid", fp8_first_last_layers_bf16=True).check_model(tiny)
    # Current scaling under recompute is deterministic, so it is allowed.
    ParallelConfig(fp8="hybrid", recompute="loop").check_model(tiny)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_transformer_engine_without_cuda_is_a_config_time_error_and_never_imported():
    import sys

    tiny = LoopLMConfig.preset("tiny")
    for parallel in (
        ParallelConfig(transformer_impl="transformer_engine", fp8="hybrid"),
        ParallelConfig(transformer_impl="transformer_engine", fp8="hybrid", fp8_recipe="mxfp8"),
        ParallelConfig(transformer_impl="transformer_engine"),
    ):
        with pytest.raises(ConfigError, match="needs a CUDA GPU.*never imported"):
            parallel.transformer_config(tiny)
    assert "transformer_engine" not in sys.modules


# ---------------------------------------------------------------------------------------------- the model


def _model_checks(rank: int, world_size: int) -> dict:
    """Which linears the FP8 model builds, and that FP8 changes the numbers (it is applied, not ignored)."""
    from looplm.model.megatron.distributed import initialize_model_parallel
    from looplm.model.megatron.fp8 import FP8ColumnParallelLinear, FP8RowParallelLinear
    from looplm.model.megatron.model import MegatronLoopLM

    three = LoopLMConfig.preset("tiny", num_hidden_layers=3)
    ids = torch.randint(0, three.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    losses, kinds = {}, {}
    for name, parallel in {
        "fp32": ParallelConfig(),
        "fp8": ParallelConfig(fp8="hybrid"),
        "fp8 first/last high": ParallelConfig(fp8="hybrid", fp8_first_last_layers_bf16=True),
    }.items():
        initialize_model_parallel(parallel, seed=0)
        model = MegatronLoopLM(three, parallel, seed=0)
        with torch.no_grad():
            losses[name] = model(ids, ids, num_steps=4).loss.item()
        kinds[name] = {
            "fp8 linears per layer": [
                sum(isinstance(m, (FP8ColumnParallelLinear, FP8RowParallelLinear)) for m in layer.modules())
                for layer in model.decoder.layers
            ],
            "head or gate fp8": any(hasattr(m, "fp8_scaling") for m in (model.output_layer, model.exit_gate)),
            "state keys": sorted(k for k in model.state_dict() if "fp8" in k or "amax" in k),
        }
    return {"losses": losses, "kinds": kinds}


def _model_checks_and_training(rank: int, world_size: int, steps: int) -> dict:
    return {"checks": _model_checks(rank, world_size), "losses": _train_per_recipe(rank, world_size, steps)}


@pytest.fixture(scope="module")
def single_process_runs(tmp_path_factory) -> dict:
    """One spawned process (megatron imports once) for the model checks and the per-recipe training runs."""
    (result,) = run_ranks(_model_checks_and_training, 1, tmp_path_factory.mktemp("fp8"), steps=16)
    return result


def test_fp8_model_uses_fp8_in_the_looped_blocks_only_and_changes_the_numbers(single_process_runs):
    result = single_process_runs["checks"]
    kinds, losses = result["kinds"], result["losses"]
    assert kinds["fp32"]["fp8 linears per layer"] == [0, 0, 0]
    assert kinds["fp8"]["fp8 linears per layer"] == [4, 4, 4]  # qkv, proj, fc1, fc2 of every physical layer
    assert kinds["fp8 first/last high"]["fp8 linears per layer"] == [0, 4, 0]
    assert not any(k["head or gate fp8"] for k in kinds.values())
    assert all(k["state keys"] == [] for k in kinds.values())  # checkpoints and HF conversion are unchanged
    assert losses["fp8"] != losses["fp32"] and abs(losses["fp8"] - losses["fp32"]) < 1e-2, losses
    assert losses["fp8 first/last high"] != losses["fp8"], losses


def _tensor_parallel_grads(rank: int, world_size: int) -> dict:
    """Gradient relative errors of FP8 at TP=1 and at TP=2 (+SP), each against fp32 at TP=1 from the same weights."""
    from megatron.core import parallel_state

    from looplm.model.megatron.convert import shard
    from looplm.model.megatron.distributed import initialize_model_parallel
    from looplm.model.megatron.model import MegatronLoopLM

    tiny = LoopLMConfig.preset("tiny")
    ids = torch.randint(0, tiny.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))  # same on all ranks

    def grads(parallel: ParallelConfig, state: dict | None) -> tuple[dict, dict, float]:
        initialize_model_parallel(parallel, seed=0)
        model = MegatronLoopLM(tiny, parallel, seed=0)
        if state is not None:
            model.load_state_dict(shard(state, parallel.tensor_parallel, rank % parallel.tensor_parallel))
        out = model(ids, ids, num_steps=4)
        out.loss.backward()
        for param in model.parameters():  # what finalize_model_grads does for the norm gains under SP
            if getattr(param, "sequence_parallel", False) and parallel.sequence_parallel:
                torch.distributed.all_reduce(param.grad, group=parallel_state.get_tensor_model_parallel_group())
        return model.state_dict(), {n: p.grad for n, p in model.named_parameters()}, out.loss.item()

    state, ref, ref_loss = grads(ParallelConfig(), None)
    ref_state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    ref_grads = shard(ref, 2, rank)
    results = {}
    for name, parallel in {
        "fp8 tp1": ParallelConfig(fp8="hybrid"),
        "fp8 tp2": ParallelConfig(fp8="hybrid", tensor_parallel=2),
        "fp8 tp2 sp": ParallelConfig(fp8="hybrid", tensor_parallel=2, sequence_parallel=True),
    }.items():
        _, got, loss = grads(parallel, ref_state)
        expected = ref if parallel.tensor_parallel == 1 else ref_grads
        errors = {n: ((got[n] - expected[n]).norm() / expected[n].norm()).item() for n in got}
        results[name] = {"loss_gap": abs(loss - ref_loss), "max_rel_err": max(errors.values()), "errors": errors}
    return results


@pytest.mark.slow
def test_fp8_linear_under_tensor_and_sequence_parallelism_tracks_fp32(tmp_path):
    """The FP8 linears get megatron's sharded weights and communication: at TP=2 (with and without SP) the
    gradients stay as close to fp32 as at TP=1. A missing all-reduce or all-gather would be O(1) off."""
    for rank_result in run_ranks(_tensor_parallel_grads, 2, tmp_path):
        tp1 = rank_result["fp8 tp1"]
        # FP8 noise at init (e5m2 gradients through 4 loops): about 0.2 relative per tensor at TP=1.
        assert tp1["loss_gap"] < 1e-2 and tp1["max_rel_err"] < 0.35, rank_result
        for name in ("fp8 tp2", "fp8 tp2 sp"):
            assert rank_result[name]["loss_gap"] < 1e-2, rank_result
            assert rank_result[name]["max_rel_err"] < 1.5 * tp1["max_rel_err"] + 0.02, rank_result


def _train_per_recipe(rank: int, world_size: int, steps: int) -> dict:
    """Stage I losses of the tiny LoopLM (T=4) per recipe: same init, same batches, plain AdamW steps."""
    from looplm.model.megatron.distributed import initialize_model_parallel
    from looplm.model.megatron.model import MegatronLoopLM

    tiny = LoopLMConfig.preset("tiny")
    g = torch.Generator().manual_seed(0)
    successors = torch.randint(0, 64, (64, 2), generator=g)  # a bigram chain over 64 tokens: learnable in a few steps
    batches = []
    for _ in range(steps):
        tokens = [torch.randint(0, 64, (8,), generator=g)]
        for _ in range(32):
            tokens.append(successors[tokens[-1], torch.randint(0, 2, (8,), generator=g)])
        batches.append(torch.stack(tokens, 1))
    losses = {}
    for name, parallel in {
        "fp32": ParallelConfig(),
        "tensorwise": ParallelConfig(fp8="hybrid", fp8_recipe="tensorwise"),
        "delayed": ParallelConfig(fp8="hybrid", fp8_recipe="delayed"),
    }.items():
        initialize_model_parallel(parallel, seed=0)
        model = MegatronLoopLM(tiny, parallel, seed=0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        losses[name] = []
        for tokens in batches:
            out = model(tokens[:, :-1], tokens[:, 1:], num_steps=4)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            losses[name].append(out.loss.item())
    return losses


@pytest.mark.slow
def test_each_fp8_recipe_trains_the_looped_model_close_to_fp32(single_process_runs):
    """The figures (gap per recipe, longer runs) are bench/fp8_bench.py's, in BENCHMARKS.md; this asserts that every
    recipe trains and that its gap to fp32 is finite and small."""
    losses = single_process_runs["losses"]
    ref = losses["fp32"]
    assert ref[-1] < ref[0] - 0.5, ref
    for name in ("tensorwise", "delayed"):
        run = losses[name]
        assert all(math.isfinite(v) for v in run), (name, run)
        assert run[-1] < run[0] - 0.5, (name, run)
        tail_gap = sum(a - b for a, b in zip(run[-4:], ref[-4:], strict=True)) / 4
        assert abs(tail_gap) < 0.05 * ref[-1], (name, tail_gap, run, ref)
        assert run != ref  # FP8 really ran


def test_fp8_on_a_gpu_that_cannot_run_it_is_a_config_time_error(monkeypatch):
    """The GPU branches of the config-time check, on a pretend GPU: only the capability query and TE's installed
    version are replaced (no such GPU here); Transformer Engine is never imported by the check."""
    import sys

    from looplm.model.megatron import fp8

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(fp8, "_te_version", lambda: (2, 8))
    te = dict(transformer_impl="transformer_engine", fp8="hybrid")
    with pytest.raises(ConfigError, match=r"compute capability >= 8.9.*A100 \(sm_80\)"):
        fp8.check_runtime(ParallelConfig(**te))
    with pytest.raises(ConfigError, match=r"compute capability >= 8.9"):
        fp8.check_runtime(ParallelConfig(fp8="hybrid"))  # the local FP8 linear's torch._scaled_mm needs it too
    fp8.check_runtime(ParallelConfig(transformer_impl="transformer_engine"))  # TE in bf16 is fine on an A100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    fp8.check_runtime(ParallelConfig(**te))
    with pytest.raises(ConfigError, match=r"'mxfp8'.*compute capability >= 10.0"):
        fp8.check_runtime(ParallelConfig(**te, fp8_recipe="mxfp8"))
    monkeypatch.setattr(fp8, "_te_version", lambda: (2, 1))
    with pytest.raises(ConfigError, match=r"'tensorwise' needs Transformer Engine >= 2.2, found 2.1"):
        fp8.check_runtime(ParallelConfig(**te))
    monkeypatch.setattr(fp8, "_te_version", lambda: None)
    with pytest.raises(ConfigError, match="needs Transformer Engine installed"):
        fp8.check_runtime(ParallelConfig(**te))
    assert "transformer_engine" not in sys.modules


def test_gpu_train_dry_run_prints_the_loop_aware_flop_count(capsys):
    """bench/gpu_train.py cannot run without a GPU; its argument parsing and FLOP arithmetic can (loaded in-process
    from its path: bench/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "bench" / "gpu_train.py"
    spec = importlib.util.spec_from_file_location("gpu_train", path)
    gpu_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_train)
    gpu_train.main(["--dry-run", "--layers", "6", "--loops", "3", "--seq", "512", "--micro-batch", "2"])
    out = capsys.readouterr().out
    config = LoopLMConfig.preset("ouro-1.4b", num_hidden_layers=6, max_position_embeddings=512)
    per_token = config.flops_per_token(512, num_steps=3)["total"]
    assert f"{per_token / 1e9:.3f} GFLOP/token" in out, out
    assert f"{per_token * 1024 / 1e12:.2f} TFLOP/step" in out, out
    assert f"{10_000 * per_token / 1e15:.1%}" in out, out  # 10k tokens/s against the dry run's made-up 1000 TFLOP/s
    with pytest.raises(SystemExit) as exit_info:
        gpu_train.parse_args(["--rows", "bf16,fp4"])
    assert exit_info.value.code == 2 and "unknown rows" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- GPU only


def _fp8_on_gpu(rank: int, world_size: int) -> dict:
    """The tiny LoopLM (T=4, bf16 params) on one GPU: TE spec in bf16 and with FP8 per recipe, and the local FP8
    linear, all from the same weights; plus the local FP8 GEMM against its dequantised reference on CUDA."""
    from looplm.model.megatron.distributed import initialize_model_parallel
    from looplm.model.megatron.fp8 import FP8Recipe, FP8Scaling, fp8_linear
    from looplm.model.megatron.model import MegatronLoopLM

    tiny = LoopLMConfig.preset("tiny")
    ids = torch.randint(0, tiny.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    te = dict(transformer_impl="transformer_engine", precision="bf16")
    cases = {
        "te bf16": ParallelConfig(**te),
        "te fp8 tensorwise": ParallelConfig(**te, fp8="hybrid"),
        "te fp8 delayed": ParallelConfig(**te, fp8="hybrid", fp8_recipe="delayed"),
        "te fp8 first/last bf16": ParallelConfig(
            **te, fp8="hybrid", fp8_first_last_layers_bf16=True, fp8_layers_at_end_in_bf16=0
        ),  # fmt: skip
        "local bf16": ParallelConfig(precision="bf16"),
        "local fp8": ParallelConfig(precision="bf16", fp8="hybrid"),
    }
    results, state = {}, None
    for name, parallel in cases.items():
        initialize_model_parallel(parallel, seed=0)
        model = MegatronLoopLM(tiny, parallel, seed=0)
        if state is None:
            state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        model.load_state_dict(state, strict=False)
        losses = []
        for _ in range(3):  # delayed scaling needs a few calls before its history is warm
            model.zero_grad()
            out = model(ids, ids, num_steps=4)
            out.loss.backward()
            losses.append(out.loss.item())
        grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        results[name] = {"loss": losses[-1], "grads_finite": grads_finite}
    x, w = torch.randn(64, 128, device="cuda") * 3, torch.randn(96, 128, device="cuda") * 0.02
    out = fp8_linear(x.bfloat16(), w.bfloat16(), FP8Scaling(FP8Recipe()))
    xq = _dequantised(x.bfloat16(), _current_scale(x.bfloat16(), E4M3), E4M3)
    wq = _dequantised(w.bfloat16(), _current_scale(w.bfloat16(), E4M3), E4M3)
    ref = xq @ wq.t()
    results["local gemm rel err"] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    return results


@pytest.mark.gpu
def test_transformer_engine_fp8_and_the_local_fp8_linear_run_the_loop_on_a_gpu(tmp_path):
    pytest.importorskip("transformer_engine")  # a CUDA machine may import it
    (results,) = run_ranks(_fp8_on_gpu, 1, tmp_path, backend="nccl")
    bf16 = results["te bf16"]["loss"]
    for name in ("te fp8 tensorwise", "te fp8 delayed", "te fp8 first/last bf16", "local fp8"):
        assert results[name]["grads_finite"] and math.isfinite(results[name]["loss"]), results
        assert results[name]["loss"] != bf16 and abs(results[name]["loss"] - bf16) < 5e-2, results
    assert abs(results["local bf16"]["loss"] - bf16) < 2e-2, results  # the two specs compute the same model
    # bf16 output rounding (2^-8) dominates; FP8 tensor-core accumulation is not full fp32 on Hopper either.
    assert results["local gemm rel err"] < 1e-2, results


@pytest.mark.gpu
def test_mxfp8_on_a_pre_blackwell_gpu_is_a_config_time_error():
    if torch.cuda.get_device_capability() >= (10, 0):
        pytest.skip("this GPU runs MXFP8")
    with pytest.raises(ConfigError, match="compute capability >= 10.0"):
        ParallelConfig(transformer_impl="transformer_engine", fp8="hybrid", fp8_recipe="mxfp8").transformer_config(
            LoopLMConfig.preset("tiny")
        )
