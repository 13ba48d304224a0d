"""Serving benchmark (not a test): the engine against the reference model generating one request at a time.

    .venv/bin/python bench/serve_bench.py                 # tiny and small presets, concurrency 1, 8, 32
    .venv/bin/python bench/serve_bench.py --presets tiny --requests 32

Three tables, each measured side by side in one run:
1. Throughput and latency. The same requests (prompt_len tokens, max_tokens generated, greedy, full depth,
   per_step) served by the engine with `concurrency` requests kept in flight (a closed loop: a finished
   request is replaced at once), and by the reference `generate` one request at a time. TTFT runs from
   submission to the first token; TPOT is (end - first token) / (tokens - 1). Engine-level: no HTTP in the loop.
2. Early exit on a trained tiny model (Stage I + Stage II gate, trained here): for each Q-exit threshold, the
   held-out NLL when every position reads out at its exit step (a teacher-forced full forward, where deeper
   keys of early-exited tokens are the full computation's), the mean exit step, and the loop work saved
   (1 - mean steps / T); then the engine decoding at the best threshold within 1% of full-depth NLL, its
   measured layer calls per token against full depth.
3. KV bytes per token for each strategy and its quality gap on the trained model, at full depth: greedy
   agreement with per_step over the generated tokens, and the held-out NLL when the held-out text is fed
   token by token through each strategy's cache (the reference model's cache and decode step).

The machine is shared and noisy: read absolute times as upper bounds; the ratios were measured in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from looplm.model import LoopLM, LoopLMConfig, QExit, select_exit_steps
from looplm.serving.engine import Engine, EngineConfig, SamplingParams


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(round(q / 100 * (len(ordered) - 1))), len(ordered) - 1)]


def _prompts(vocab: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (count, length), generator=g).tolist()


def engine_run(model, prompts, max_tokens, concurrency, strategy="per_step", threshold=1.0):
    engine = Engine(
        model,
        EngineConfig(
            kv_cache=strategy,
            max_batch_size=concurrency,
            max_queue=concurrency,
            max_batch_tokens=max(2048, concurrency * (len(prompts[0]) + 1)),
            kv_cache_tokens=concurrency * (len(prompts[0]) + max_tokens + 16),
            max_tokens_limit=max_tokens,
        ),
    )
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, exit_threshold=threshold)
    pending = list(range(len(prompts)))
    submitted, first, ended, tokens, index = {}, {}, {}, {}, {}
    started = time.perf_counter()
    inflight = 0
    while pending or engine.has_work():
        while pending and inflight < concurrency:
            i = pending.pop(0)
            rid = engine.add_request(prompts[i], params)
            submitted[rid], index[rid], tokens[rid] = time.perf_counter(), i, []
            inflight += 1
        for event in engine.step():
            now = time.perf_counter()
            first.setdefault(event.request_id, now)
            if event.token_id is not None:
                tokens[event.request_id].append(event.token_id)
            if event.finish_reason:
                ended[event.request_id] = now
                inflight -= 1
    wall = time.perf_counter() - started
    total = sum(len(t) for t in tokens.values())
    ttft = [first[r] - submitted[r] for r in submitted]
    tpot = [(ended[r] - first[r]) / (len(tokens[r]) - 1) for r in submitted if len(tokens[r]) > 1]
    outputs = [None] * len(prompts)
    for rid, i in index.items():
        outputs[i] = tokens[rid]
    return {"tok_s": total / wall, "ttft": ttft, "tpot": tpot, "outputs": outputs, "stats": engine.stats()}


def reference_run(model, prompts, max_tokens):
    """The reference generate, one request at a time (its first token timed by a separate 1-token call)."""
    ttft, tpot, total, outputs = [], [], 0, []
    started = time.perf_counter()
    for prompt in prompts:
        t0 = time.perf_counter()
        out = model.generate([prompt], max_new_tokens=max_tokens)
        elapsed = time.perf_counter() - t0
        outputs.append(out.tokens[0])
        total += len(out.tokens[0])
        tpot.append(elapsed / len(out.tokens[0]))
    wall = time.perf_counter() - started
    for prompt in prompts[: min(8, len(prompts))]:
        t0 = time.perf_counter()
        model.generate([prompt], max_new_tokens=1)
        ttft.append(time.perf_counter() - t0)
    return {"tok_s": total / wall, "ttft": ttft, "tpot": tpot, "outputs": outputs}


def throughput_table(presets, concurrencies, requests, prompt_len, max_tokens) -> None:
    print("\n## Throughput and latency (greedy, full depth, per_step; engine vs reference one at a time)")
    print("| preset | server | concurrency | tok/s | vs reference | TTFT p50 / p99 ms | TPOT p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for preset in presets:
        torch.manual_seed(0)
        model = LoopLM(LoopLMConfig.preset(preset)).eval()
        prompts = _prompts(model.config.vocab_size, requests, prompt_len)
        base = reference_run(model, prompts[: max(4, requests // 8)], max_tokens)
        _row(preset, "reference", 1, base, base["tok_s"])
        for c in concurrencies:
            result = engine_run(model, prompts, max_tokens, c)
            agree = sum(a == b for a, b in zip(result["outputs"], base["outputs"], strict=False))
            _row(preset, "engine", c, result, base["tok_s"], f" (greedy = reference on {agree}/{len(base['outputs'])})")


def _row(preset, server, c, r, base_tok_s, note="") -> None:
    ms = 1000.0
    print(
        f"| {preset} | {server} | {c} | {r['tok_s']:.0f} | {r['tok_s'] / base_tok_s:.1f}x{note} | "
        f"{_percentile(r['ttft'], 50) * ms:.1f} / {_percentile(r['ttft'], 99) * ms:.1f} | "
        f"{_percentile(r['tpot'], 50) * ms:.2f} / {_percentile(r['tpot'], 99) * ms:.2f} |",
        flush=True,
    )


def train_tiny() -> tuple[LoopLM, torch.Tensor]:
    """The tiny model trained as the test fixtures do (Stage I, then Stage II on the gate); held-out rows."""
    from looplm.model.tokenizer import END_OF_DOCUMENT, PAD, special_token_id, train_byte_level_bpe
    from looplm.pipelines import synthetic
    from looplm.pipelines.reference_train import TrainSettings, pack_documents, train

    torch.manual_seed(0)
    texts = synthetic.biographies(300, seed=0, exposures=4)
    config = LoopLMConfig.preset("tiny")
    tokenizer = train_byte_level_bpe(texts, config.vocab_size)
    eod = special_token_id(tokenizer, END_OF_DOCUMENT)
    config = dataclasses.replace(
        config, bos_token_id=eod, eos_token_id=eod, pad_token_id=special_token_id(tokenizer, PAD)
    )
    rows = pack_documents((e.ids for e in tokenizer.encode_batch(texts)), eod, 64)
    valid, train_rows = rows[:32], rows[32:]
    model = LoopLM(config)
    train(model, train_rows, TrainSettings(steps=150, batch_size=16, lr=3e-3, warmup_steps=10, beta=0.05))
    train(model, train_rows, TrainSettings(steps=40, batch_size=16, lr=1e-2, warmup_steps=3, stage="stage2"))
    return model.eval(), valid


@torch.no_grad()
def early_exit_table(model: LoopLM, valid: torch.Tensor, thresholds, prompt_len: int, max_tokens: int) -> float:
    steps = model.config.total_ut_steps
    out = model(valid[:, :-1])
    labels = valid[:, 1:]
    nll_per_step = torch.stack(
        [torch.nn.functional.cross_entropy(lg.transpose(1, 2), labels, reduction="none") for lg in out.logits], -1
    )  # [rows, seq, T]
    full = nll_per_step[..., -1].mean().item()
    print("\n## Early exit on the trained tiny model (Q-exit; held-out NLL, teacher-forced)")
    print("| threshold q | mean exit step | loop work saved | NLL | NLL gap vs full depth |")
    print("|---|---|---|---|---|")
    best = 1.0
    for q in thresholds:
        exits = select_exit_steps(out.hidden_states, out.gate_logits, QExit(q))
        nll = nll_per_step.gather(-1, (exits - 1)[..., None])[..., 0].mean().item()
        mean_steps = exits.float().mean().item()
        gap = (nll - full) / full
        print(f"| {q:.2f} | {mean_steps:.2f} | {1 - mean_steps / steps:.0%} | {nll:.4f} | {gap:+.2%} |", flush=True)
        if gap <= 0.01:
            best = min(best, q)
    prompts = [row[:prompt_len] for row in valid.tolist()]
    full_run = engine_run(model, prompts, max_tokens, len(prompts), threshold=1.0)
    early_run = engine_run(model, prompts, max_tokens, len(prompts), threshold=best)
    f, e = full_run["stats"], early_run["stats"]
    print(
        f"\nEngine decoding, {len(prompts)} held-out prompts x {max_tokens} tokens: at q = {best:.2f} "
        f"{e.layer_calls_per_token:.2f} layer calls per decoded token against {f.layer_calls_per_token:.2f} at full "
        f"depth ({1 - e.layer_calls_per_token / f.layer_calls_per_token:.0%} saved); "
        f"{early_run['tok_s']:.0f} tok/s against {full_run['tok_s']:.0f} tok/s."
    )
    return best


@torch.no_grad()
def teacher_forced_nll(model: LoopLM, rows: torch.Tensor, prefix: int, strategy: str) -> float:
    """Mean NLL of rows[:, prefix:] fed one token at a time through a KV cache of `strategy` (full depth), with
    the reference model's own cache and decode step: the quality a strategy keeps when decoding."""
    from looplm.model.generation import _decode_one
    from looplm.model.kv_cache import KVCache

    config, steps = model.config, model.config.total_ut_steps
    batch, length = rows.shape
    out = model(rows[:, :prefix], steps, return_logits=False, return_kv=True)
    cache = KVCache(
        strategy,
        num_layers=config.num_hidden_layers,
        num_steps=steps,
        batch=batch,
        kv_heads=config.num_key_value_heads,
        head_dim=config.attention_head_dim,
        capacity=length,
        dtype=out.hidden_states[0].dtype,
    )
    cache.prefill(out.kv)
    h, total = out.hidden_states[-1][:, -1], 0.0
    for position in range(prefix, length):
        target = rows[:, position]
        total += torch.nn.functional.cross_entropy(model.lm_head(h).float(), target, reduction="sum").item()
        if position == length - 1:
            break
        positions = torch.full((batch,), position)
        h, exits = _decode_one(model, cache, target, positions, None, None, steps, QExit(1.0))
        cache.commit(exits, None)
    return total / (batch * (length - prefix))


def kv_table(model: LoopLM, valid: torch.Tensor, prompt_len: int, max_tokens: int) -> None:
    prompts = [row[:prompt_len] for row in valid.tolist()]
    print(f"\n## KV strategies on the trained tiny model ({len(prompts)} held-out prompts x {max_tokens} tokens)")
    print(
        "| strategy | KV bytes / token (fp32) | greedy agreement with per_step | identical outputs "
        "| held-out NLL, teacher-forced | NLL gap vs per_step |"
    )
    print("|---|---|---|---|---|---|")
    base = engine_run(model, prompts, max_tokens, len(prompts), "per_step")
    base_nll = teacher_forced_nll(model, valid, prompt_len, "per_step")
    for strategy in ("per_step", "last_step", "average"):
        run = base if strategy == "per_step" else engine_run(model, prompts, max_tokens, len(prompts), strategy)
        pairs = [
            (a, b) for x, y in zip(run["outputs"], base["outputs"], strict=True) for a, b in zip(x, y, strict=True)
        ]
        agree = sum(a == b for a, b in pairs) / len(pairs)
        same = sum(x == y for x, y in zip(run["outputs"], base["outputs"], strict=True))
        nll = base_nll if strategy == "per_step" else teacher_forced_nll(model, valid, prompt_len, strategy)
        print(
            f"| {strategy} | {run['stats'].kv_bytes_per_token} | {agree:.1%} | {same}/{len(prompts)} "
            f"| {nll:.4f} | {(nll - base_nll) / base_nll:+.2%} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fair on a shared machine)")
    parser.add_argument("--skip-throughput", action="store_true", help="only the early-exit and KV tables")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s); requests {args.requests}, prompt {args.prompt_len}, "
        f"max_tokens {args.max_tokens}"
    )
    if not args.skip_throughput:
        throughput_table(args.presets, args.concurrency, args.requests, args.prompt_len, args.max_tokens)
    t0 = time.perf_counter()
    model, valid = train_tiny()
    print(f"\n(trained the tiny model in {time.perf_counter() - t0:.0f} s)")
    early_exit_table(model, valid, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], 16, 32)
    kv_table(model, valid, 16, 32)


if __name__ == "__main__":
    main()
