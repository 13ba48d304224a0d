"""Loop-robust training options against default training: validation CE at T-2 .. T+4 recurrent steps.

    python bench/loop_robust_bench.py [--steps 300] [--seeds 0 1] [--trained-t 4]

Every case trains the same tiny reference LoopLM (same init, same batches: the options draw nothing from the data
generator) at T = trained-t on the counting + motif corpus of the Megatron trainer's synthetic data, then runs the
held-out rows for T + 4 steps. The table gives the mean CE per step over seeds, the change from T to T + 4
(the target of issue 14: no loss at T + 4; negative is better), and two diagnostics measured at T on the held-out
rows: the contraction estimate of the last pass and the KV consistency term (what each penalty trains down).
A measurement, not a test: the numbers move with the machine's load only in time, not in value.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import torch

from looplm.model import LoopLM, LoopLMConfig, stage1_loss
from looplm.pipelines.reference_train import TrainSettings, pack_documents, per_step_validation, split_batch, train
from looplm.pipelines.training.data import synthetic_documents

VOCAB = 128
EOD = 0
CASES = {
    "default": ({}, False),
    "random_steps [T-2, T+2]": ({"random_steps": "around"}, False),
    "contraction 0.1": ({"contraction_penalty": 0.1}, False),
    "kv_consistency 1.0": ({"kv_consistency": 1.0}, False),
    "reinject_embedding": ({}, True),
    "reinject + random_steps": ({"random_steps": "around"}, True),
}


def corpus(seed: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    docs = synthetic_documents(600, VOCAB, EOD, seed, "counting") + synthetic_documents(
        600, VOCAB, EOD, seed + 1, "motif"
    )
    rows = pack_documents(docs, EOD, seq)
    rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))]
    held_out = max(32, rows.shape[0] // 10)
    return rows[held_out:], rows[:held_out]


@torch.no_grad()
def diagnostics(model: LoopLM, valid: torch.Tensor, steps: int) -> tuple[float, float]:
    inputs, labels = split_batch(valid[:32])
    out = stage1_loss(
        model, inputs, labels, beta=0.0, num_steps=steps, contraction_penalty=1.0, kv_consistency=1.0, probe_seed=0
    )
    return out.contraction.item(), out.kv_consistency.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--trained-t", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    big_t = args.trained_t
    shown = list(range(max(1, big_t - 2), big_t + 5))
    config = LoopLMConfig.preset("tiny", vocab_size=VOCAB, total_ut_steps=big_t)
    results: dict[str, list[tuple[list[float], float, float, float]]] = {name: [] for name in CASES}
    for seed in args.seeds:
        train_rows, valid_rows = corpus(seed, args.seq)
        for name, (options, reinject) in CASES.items():
            options = dict(options)
            if options.get("random_steps") == "around":
                options["random_steps"] = (max(1, big_t - 2), big_t + 2)
            torch.manual_seed(seed)
            model = LoopLM(dataclasses.replace(config, reinject_embedding=reinject))
            settings = TrainSettings(
                steps=args.steps, batch_size=args.batch, lr=3e-3, warmup_steps=20, seed=seed, log_every=10**9, **options
            )
            start = time.perf_counter()
            train(model, train_rows, settings)
            seconds = time.perf_counter() - start
            ce = per_step_validation(model, valid_rows, num_steps=big_t + 4).tolist()
            results[name].append((ce, *diagnostics(model, valid_rows, big_t), seconds))
            print(f"  seed {seed} {name}: CE@T {ce[big_t - 1]:.4f} CE@T+4 {ce[-1]:.4f} ({seconds:.0f} s)", flush=True)

    print(
        f"\nloop-robust bench: tiny LoopLM (d={config.hidden_size}, {config.num_hidden_layers} layers), "
        f"trained T={big_t}, "
        f"{args.steps} steps x {args.batch} x {args.seq} tokens, seeds {args.seeds}; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    header = (
        "| case | " + " | ".join(f"CE t={t}" for t in shown) + " | CE(T+4) - CE(T) | contraction | KV term | train s |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, runs in results.items():
        mean = [statistics.fmean(run[0][t - 1] for run in runs) for t in shown]
        drift = statistics.fmean(run[0][big_t + 3] - run[0][big_t - 1] for run in runs)
        spread = (
            f" ±{statistics.stdev(run[0][big_t + 3] - run[0][big_t - 1] for run in runs):.3f}" if len(runs) > 1 else ""
        )
        contraction = statistics.fmean(run[1] for run in runs)
        kv = statistics.fmean(run[2] for run in runs)
        seconds = statistics.fmean(run[3] for run in runs)
        cells = " | ".join(f"{value:.3f}" for value in mean)
        print(f"| {name} | {cells} | {drift:+.3f}{spread} | {contraction:.3f} | {kv:.4f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
