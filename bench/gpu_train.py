"""Training throughput of an Ouro-1.4B-shaped LoopLM on one GPU: bf16 (local spec) against FP8, with MFU.

    python bench/gpu_train.py                      # on a CUDA machine: a few minutes
    python bench/gpu_train.py --dry-run            # anywhere: the plan and the FLOP arithmetic, nothing run

One process, one GPU (NCCL world of 1), megatron-core's DDP + DistributedOptimizer as a GPU training run uses
them, the Stage I objective at T loops. Rows, side by side in one run:
- bf16, transformer_impl="local" (torch modules, math attention);
- FP8 with the TE spec (transformer_impl="transformer_engine", the default recipe of model/megatron/fp8.py)
  where Transformer Engine is installed, otherwise a line saying it was skipped;
- FP8 with the local FP8 linear (torch._scaled_mm on the GPU): what runs without TE.
Each row prints tokens/s, model TFLOP/s from the loop-aware count `LoopLMConfig.flops_per_token` (the stack T
times, the LM head and exit gate at every step, backward = 2x forward; activation recompute is not counted),
MFU against the bf16 matmul rate measured in the same run (a large square torch.matmul, not the datasheet), and
the ratio to the bf16 row. Sizes default to what fits an H200 without recompute (fewer layers than the 24 of
Ouro-1.4B; the per-layer shape is Ouro's); --layers/--seq/--micro-batch change that.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import time

import torch

from looplm.model import LoopLMConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="physical layers (Ouro-1.4B has 24)")
    parser.add_argument("--loops", type=int, default=4, help="T, recurrent steps per forward")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per row")
    parser.add_argument("--fp8-recipe", default="tensorwise", choices=("tensorwise", "delayed", "mxfp8"))
    parser.add_argument("--rows", default="bf16,te-fp8,local-fp8", help="comma-separated subset of the rows")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--dry-run", action="store_true", help="print the plan and FLOP counts; needs no GPU")
    args = parser.parse_args(argv)
    unknown = set(args.rows.split(",")) - {"bf16", "te-fp8", "local-fp8"}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; known: bf16, te-fp8, local-fp8")
    if min(args.layers, args.loops, args.seq, args.micro_batch, args.steps) < 1:
        parser.error("--layers, --loops, --seq, --micro-batch and --steps must be positive")
    return args


def model_config(args: argparse.Namespace) -> LoopLMConfig:
    return LoopLMConfig.preset(
        "ouro-1.4b", num_hidden_layers=args.layers, total_ut_steps=args.loops, max_position_embeddings=args.seq
    )


def flop_plan(config: LoopLMConfig, args: argparse.Namespace) -> dict[str, float]:
    """Model FLOPs of one optimizer step and their split; the arithmetic behind every figure printed."""
    per_token = config.flops_per_token(args.seq, num_steps=args.loops)
    tokens = args.seq * args.micro_batch
    return {
        "params": config.num_parameters(),
        "tokens_per_step": tokens,
        "flops_per_token": per_token["total"],
        "flops_per_step": per_token["total"] * tokens,
    }


def mfu_row(name: str, tokens_per_s: float, flops_per_token: float, peak: float, base: float | None) -> str:
    tflops = tokens_per_s * flops_per_token / 1e12
    ratio = f"{tokens_per_s / base:.2f}x" if base else "1.00x"
    return f"| {name} | {tokens_per_s:,.0f} | {tflops:.1f} | {tflops * 1e12 / peak:.1%} | {ratio} |"


def matmul_rate(size: int, dtype: torch.dtype, repeats: int = 20) -> float:
    """FLOP/s of a size^3 matmul on this GPU (fp8: torch._scaled_mm with tensor scales)."""
    a = torch.randn(size, size, device="cuda").to(dtype)
    b = torch.randn(size, size, device="cuda").to(dtype)
    if dtype in (torch.float8_e4m3fn,):
        one = torch.ones((), device="cuda")
        b = b.t().contiguous().t()

        def run():
            return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    else:

        def run():
            return a @ b

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def time_training(config: LoopLMConfig, parallel, args: argparse.Namespace) -> float:
    """Tokens/s of Stage I optimizer steps (Megatron DDP + DistributedOptimizer, bf16 params)."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from looplm.model.megatron.distributed import initialize_model_parallel, wrap_data_parallel
    from looplm.model.megatron.model import MegatronLoopLM

    initialize_model_parallel(parallel, seed=0)
    model = MegatronLoopLM(config, parallel, seed=0)
    ddp = wrap_data_parallel(model, use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=1e-4, bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=True
        ),
        [ddp],
    )
    ids = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq + 1), device="cuda")

    def step() -> float:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        out = ddp(ids[:, :-1], ids[:, 1:], num_steps=args.loops)
        out.loss.backward()
        finalize_model_grads([ddp])
        optimizer.step()
        return out.loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if not math.isfinite(float(loss)):
        raise RuntimeError(f"non-finite loss {float(loss)}")
    return args.micro_batch * args.seq * args.steps / elapsed


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = model_config(args)
    plan = flop_plan(config, args)
    print(
        f"# gpu_train: Ouro-1.4B shape (d={config.hidden_size}, ffn={config.intermediate_size}, "
        f"heads={config.num_attention_heads}, vocab={config.vocab_size}) with {args.layers} layers x T={args.loops}, "
        f"seq {args.seq} x micro-batch {args.micro_batch}, {plan['params'] / 1e9:.3f} B params"
    )
    print(
        f"# model FLOPs: {plan['flops_per_token'] / 1e9:.3f} GFLOP/token (loop-aware, fwd+bwd), "
        f"{plan['tokens_per_step']} tokens/step = {plan['flops_per_step'] / 1e12:.2f} TFLOP/step"
    )
    if args.dry_run:
        print("# dry run: nothing executed. 10k tokens/s against a made-up 1000 TFLOP/s peak would read:")
        print(mfu_row("example", 10_000.0, plan["flops_per_token"], 1000e12, None))
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_train.py needs a CUDA GPU (use --dry-run elsewhere)")

    from looplm.model.megatron.config import ParallelConfig

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29591")
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    name = torch.cuda.get_device_name()
    peak = matmul_rate(args.matmul_size, torch.bfloat16)
    print(
        f"# {name}, torch {torch.__version__}, bf16 matmul {args.matmul_size}^3: {peak / 1e12:.0f} TFLOP/s (measured)"
    )
    try:
        fp8_peak = matmul_rate(args.matmul_size, torch.float8_e4m3fn)
        print(f"# fp8 _scaled_mm {args.matmul_size}^3: {fp8_peak / 1e12:.0f} TFLOP/s ({fp8_peak / peak:.2f}x bf16)")
    except RuntimeError as err:
        print(f"# fp8 _scaled_mm unavailable: {err}")

    rows = args.rows.split(",")
    cases = {
        "bf16 (local spec)": ("bf16", dict(precision="bf16")),
        f"FP8 {args.fp8_recipe} (TE spec)": (
            "te-fp8",
            dict(transformer_impl="transformer_engine", precision="bf16", fp8="hybrid", fp8_recipe=args.fp8_recipe),
        ),
        f"FP8 {args.fp8_recipe} (local FP8 linear)": (
            "local-fp8",
            dict(precision="bf16", fp8="hybrid", fp8_recipe=args.fp8_recipe),
        ),
    }
    print("\n| case | tokens/s | model TFLOP/s | MFU (vs measured bf16 matmul) | x bf16 |\n|---|---|---|---|---|")
    base = None
    for label, (row, parallel) in cases.items():
        if row not in rows:
            continue
        try:
            parallel = ParallelConfig(**parallel)
            parallel.transformer_config(config)  # the config-time checks: TE present, FP8-capable GPU, recipe
            tokens_per_s = time_training(config, parallel, args)
            gc.collect()
            torch.cuda.empty_cache()
        except Exception as err:  # a row that cannot run says why; the others still run
            print(f"| {label} | skipped: {type(err).__name__}: {str(err)[:200]} | | | |")
            torch.cuda.empty_cache()
            continue
        print(mfu_row(label, tokens_per_s, plan["flops_per_token"], peak, base), flush=True)
        if row == "bf16":
            base = tokens_per_s
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
