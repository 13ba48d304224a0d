"""FP8 on CPU: the FP8 GEMM rate against fp32, and the loss gap of each FP8 recipe to fp32 on a looped model.

    .venv/bin/python bench/fp8_bench.py                 # both tables (about 2-3 minutes on 2 cores)
    .venv/bin/python bench/fp8_bench.py --steps 60 --skip-gemm

1. GEMM rate: x @ W^T as fp32, bf16 and FP8 (`torch._scaled_mm` on pre-quantised e4m3 operands, and the whole
   FP8 linear forward including quantisation), GFLOP/s and the ratio to fp32, side by side in one run.
2. Loss gap: the tiny Megatron LoopLM (T=4), same init and same batches, a plain loop of AdamW steps on the
   Stage I objective, once in fp32 and once per FP8 recipe (model/megatron/fp8.py). The gap is the FP8 loss minus
   the fp32 loss, averaged over the last quarter of the run. Also the spread of each FP8 linear's input and
   output-gradient amax over the T calls of one step (max/min over loops, in the fp32 run): the quantity that
   decides whether one amax history shared by T loops can fit every loop.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

RECIPES = {  # name -> ParallelConfig FP8 fields (None: the fp32 reference)
    "fp32": None,
    "tensorwise (current)": dict(fp8="hybrid", fp8_recipe="tensorwise"),
    "delayed len=16 max": dict(fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=16),
    "delayed len=4 max": dict(fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=4),
    "delayed len=1 most_recent": dict(
        fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=1, fp8_amax_compute_algo="most_recent"
    ),
    "tensorwise, e4m3 grads": dict(fp8="e4m3", fp8_recipe="tensorwise"),
    "delayed len=16 max, e4m3 grads": dict(fp8="e4m3", fp8_recipe="delayed", fp8_amax_history_len=16),
}


def gemm_rates(sizes: list[tuple[int, int, int]], repeats: int) -> None:
    from looplm.model.megatron.fp8 import E4M3, FP8Recipe, FP8Scaling, fp8_linear, quantize, scaled_mm

    print(f"\n## FP8 GEMM rate on CPU (torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    print("| M x K x N | fp32 GFLOP/s | bf16 (x fp32) | FP8 _scaled_mm (x fp32) | FP8 linear with quantise (x fp32) |")
    print("|---|---|---|---|---|")
    one = torch.tensor(1.0)
    for m, k, n in sizes:
        x, w = torch.randn(m, k), torch.randn(n, k) * 0.02
        x8, w8 = quantize(x, one, E4M3), quantize(w, one, E4M3)
        xb, wb = x.bfloat16(), w.bfloat16()
        flops = 2 * m * k * n
        fp32 = _rate(torch.matmul, (x, w.t()), flops, repeats)
        bf16 = _rate(torch.matmul, (xb, wb.t()), flops, repeats)
        fp8 = _rate(scaled_mm, (x8, w8.t(), one, one, torch.float32), flops, repeats)
        linear = _rate(fp8_linear, (x, w, FP8Scaling(FP8Recipe())), flops, repeats)
        print(
            f"| {m} x {k} x {n} | {fp32:.1f} | {bf16:.1f} ({bf16 / fp32:.2f}x) | {fp8:.1f} ({fp8 / fp32:.2f}x) | "
            f"{linear:.1f} ({linear / fp32:.2f}x) |"
        )


def _rate(fn, args: tuple, flops: int, repeats: int) -> float:
    """GFLOP/s of fn(*args), after one warm-up call."""
    fn(*args)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return flops * repeats / (time.perf_counter() - start) / 1e9


def bigram_batches(vocab: int, steps: int, batch: int, seq: int, seed: int = 0) -> list[torch.Tensor]:
    """Token streams of a random bigram chain over `vocab` tokens, 4 successors each: learnable in a few dozen
    steps (the loss floor is ln 4 = 1.39)."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    batches = []
    for _ in range(steps):
        tokens = torch.empty(batch, seq, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for i in range(1, seq):
            pick = torch.randint(0, 4, (batch,), generator=g)
            tokens[:, i] = successors[tokens[:, i - 1], pick]
        batches.append(tokens)
    return batches


def train_losses(fp8_fields: dict | None, batches: list[torch.Tensor], lr: float, num_steps: int):
    """Per-step Stage I losses of the tiny Megatron LoopLM, and what the probe hooks saw (see `_probe`)."""
    from looplm.model import LoopLMConfig
    from looplm.model.megatron.config import ParallelConfig
    from looplm.model.megatron.distributed import initialize_model_parallel
    from looplm.model.megatron.model import MegatronLoopLM

    config = LoopLMConfig.preset("tiny")
    parallel = ParallelConfig(**(fp8_fields or {}))
    initialize_model_parallel(parallel, seed=0)
    model = MegatronLoopLM(config, parallel, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    stats = _probe(model)
    losses = []
    for step, tokens in enumerate(batches):
        stats["step"] = step
        out = model(tokens[:, :-1], tokens[:, 1:], num_steps=num_steps)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(out.loss.item())
    return losses, stats


def _probe(model: torch.nn.Module) -> dict:
    """Hooks on the stack's linears: each call's input / output-gradient amax in the first step (the per-loop
    spread), and for FP8 linears the share of elements the scale in use saturates (|x * scale| > fp8_max) or
    flushes to zero, over the whole run. Read-only: the scale in use is the delayed state before the call, or
    the current tensor's own scale."""
    from looplm.model.megatron.fp8 import E4M3, GRAD, INPUT, fp8_max, quantize, scale_from_amax

    stats = {"step": 0, "amax": {}, "input": [0, 0, 0], "grad": [0, 0, 0]}  # [saturated, flushed, nonzero]

    def count(module, x, slot, dtype, key):
        scaling = getattr(module, "fp8_scaling", None)
        if scaling is None:
            return
        x = x.detach().float()
        if scaling.recipe.recipe == "delayed":
            scale = scaling.scale[slot]
        else:
            scale = scale_from_amax(x.abs().max(), dtype, scaling.recipe.margin, torch.ones(()))
        nonzero = x != 0
        stats[key][0] += int(((x.abs() * scale) > fp8_max(dtype) * (1 + 2**-20)).sum())  # past fp32 rounding
        stats[key][1] += int((nonzero & (quantize(x, scale, dtype) == 0)).sum())
        stats[key][2] += int(nonzero.sum())

    for name, module in model.decoder.named_modules():
        if not name.endswith(("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")):
            continue
        stats["amax"][name] = ([], [])

        def forward_pre(module, args, name=name):
            if stats["step"] == 0:
                stats["amax"][name][0].append(args[0].abs().max().item())
            count(module, args[0], INPUT, E4M3, "input")

        def backward_pre(module, grad_output, name=name):
            if stats["step"] == 0:
                stats["amax"][name][1].append(grad_output[0].abs().max().item())
            scaling = getattr(module, "fp8_scaling", None)
            if scaling is not None:
                count(module, grad_output[0], GRAD, scaling.recipe.grad_dtype, "grad")

        module.register_forward_pre_hook(forward_pre)
        module.register_full_backward_pre_hook(backward_pre)
    return stats


def loss_gaps(steps: int, num_steps: int, batch: int, seq: int, lr: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29761"))
    os.environ.update(RANK="0", WORLD_SIZE="1")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    batches = bigram_batches(64, steps, batch, seq + 1)
    tail = max(1, steps // 4)
    results, stats, seconds = {}, {}, {}
    for name, fields in RECIPES.items():
        start = time.perf_counter()
        results[name], stats[name] = train_losses(fields, batches, lr, num_steps)
        seconds[name] = time.perf_counter() - start
    ref = results["fp32"]
    print(f"\n## FP8 recipes on the looped model: loss gap to fp32 (tiny preset, T={num_steps}, {steps} AdamW steps,")
    print(f"## batch {batch} x {seq} tokens, lr {lr}; gap = mean over the last {tail} steps of loss - fp32 loss)\n")
    print(
        "| recipe | step-1 loss | final loss (last-quarter mean) | gap to fp32 | gap / fp32 | max per-step gap | "
        "inputs saturated / flushed | grads saturated / flushed |"
    )
    print("|---|---|---|---|---|---|---|---|")
    ref_tail = statistics.mean(ref[-tail:])
    for name, losses in results.items():
        final = statistics.mean(losses[-tail:])
        gap = final - ref_tail
        worst = max(abs(a - b) for a, b in zip(losses, ref, strict=True))
        shares = []
        for kind in ("input", "grad"):
            saturated, flushed, nonzero = stats[name][kind]
            shares.append(f"{saturated / nonzero:.3%} / {flushed / nonzero:.3%}" if nonzero else "-")
        print(
            f"| {name} | {losses[0]:.4f} | {final:.4f} | {gap:+.4f} | {gap / ref_tail:+.2%} | {worst:.4f} | "
            f"{shares[0]} | {shares[1]} |"
        )
    print("\nPer-loop amax spread in the fp32 run (first step): max/min of a linear's amax over its T calls")
    for i, kind in enumerate(("input", "grad")):
        values = sorted(max(c[i]) / min(c[i]) for c in stats["fp32"]["amax"].values() if min(c[i]) > 0)
        print(f"  {kind:5s}: median {statistics.median(values):.2f}x, max {values[-1]:.2f}x over {len(values)} linears")
    print("\nSeconds per run: " + ", ".join(f"{name} {s:.0f}" for name, s in seconds.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-gemm", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    machine = platform.processor() or platform.machine()
    print(f"# fp8_bench: {machine}, {os.cpu_count()} cores, torch {torch.__version__}")
    if not args.skip_gemm:
        gemm_rates([(1024, 1024, 1024), (2048, 2048, 2048), (2048, 2048, 5632)], args.repeats)
    if not args.skip_training:
        loss_gaps(args.steps, args.loops, args.batch, args.seq, args.lr)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
