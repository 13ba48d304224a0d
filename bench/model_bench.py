"""Reference-model throughput: the cost of each recurrent step, and decoding with each KV cache strategy.

    python bench/model_bench.py [--preset tiny] [--batch 8] [--seq 256] [--repeats 5]

Prints two tables. Forward: tokens/s for T = 1..4 and the ratio to T = 1 (ideal: 1/T, since every step runs
the whole stack again). Decode: tokens/s and KV-cache bytes per token for per_step, last_step and average,
each decoding the same prompts, plus per_step with Q-exit at q = 0 (one step per token: the early-exit
ceiling). Each row takes the median of interleaved repeats, so the ratios are measured side by side.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from looplm.model import KVCache, LoopLM, LoopLMConfig, QExit


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_table(model: LoopLM, batch: int, seq: int, repeats: int) -> list[tuple[int, float]]:
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    rows = []
    with torch.no_grad():
        for steps in (1, 2, 3, 4):
            seconds = _median_seconds(lambda s=steps: model(ids, s), repeats)
            rows.append((steps, batch * seq / seconds))
    return rows


def decode_table(model: LoopLM, batch: int, prompt_len: int, new_tokens: int, repeats: int):
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len)).tolist()
    cases = [
        ("per_step", QExit(1.0)),
        ("last_step", QExit(1.0)),
        ("average", QExit(1.0)),
        ("per_step, q=0 (1 step)", QExit(0.0)),
    ]
    rows = []
    for name, policy in cases:
        strategy = name.split(",")[0]
        sizes = {}
        original = KVCache.prefill

        def measuring_prefill(self, kv, original=original, sizes=sizes):
            original(self, kv)
            sizes["bytes"] = self.nbytes()
            sizes["capacity"] = self.keys[0].shape[2] * self.keys[0].shape[0]

        KVCache.prefill = measuring_prefill
        try:
            seconds = _median_seconds(
                lambda s=strategy, p=policy: model.generate(
                    prompts, max_new_tokens=new_tokens, kv_cache=s, exit_policy=p
                ),
                repeats,
            )
        finally:
            KVCache.prefill = original
        rows.append((name, batch * new_tokens / seconds, sizes["bytes"] / sizes["capacity"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LoopLM(LoopLMConfig.preset(args.preset)).eval()
    print(
        f"preset {args.preset} ({model.config.num_parameters():,} params), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )

    print(f"\nforward, batch {args.batch} x seq {args.seq}")
    print(f"{'T':>3} {'tokens/s':>12} {'ratio to T=1':>13} {'ideal 1/T':>10}")
    forward = forward_table(model, args.batch, args.seq, args.repeats)
    base = forward[0][1]
    for steps, rate in forward:
        print(f"{steps:>3} {rate:>12,.0f} {rate / base:>13.3f} {1 / steps:>10.3f}")

    prompt_len = args.seq // 2
    print(f"\ndecode, batch {args.batch}, prompt {prompt_len}, {args.new_tokens} new tokens, T=4")
    print(f"{'KV cache':<24} {'tokens/s':>10} {'ratio':>7} {'KV bytes/token':>15}")
    decode = decode_table(model, args.batch, prompt_len, args.new_tokens, args.repeats)
    base = decode[0][1]
    for name, rate, per_token in decode:
        print(f"{name:<24} {rate:>10,.1f} {rate / base:>7.2f} {per_token:>15,.0f}")


if __name__ == "__main__":
    main()
