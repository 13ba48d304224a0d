"""Megatron LoopLM throughput on CPU: training tokens/s and model TFLOP/s at TP=1, TP=2 and DP=2, and the cost of
looping against an unrolled model of the same total depth.

    python bench/megatron_bench.py [--preset tiny] [--seq 128] [--micro-batch 8] [--steps 30] [--repeats 7]

Table 1 runs the real trainer (pipelines.training.trainer.train_on_rank: Megatron DDP, vocab-parallel CE, torch
AdamW unless the row names megatron's DistributedOptimizer, which bf16 params imply) on gloo groups of 1 or 2
processes over the synthetic indexed-dataset mixture; tokens/s is over the steps after the first log interval
(warm-up), checkpoint time excluded; TFLOP/s uses LoopLMConfig.flops_per_token.

Table 2, in one process, forward+backward of the same data, interleaved repeats, fastest of each (the least
disturbed by other load on a shared machine):
- looped:   N layers run T times (MegatronLoopLM, last step's CE only: the loop's own cost);
- unrolled: N*T distinct layers run once (MegatronLoopLM with N*T layers and T = 1: same layers, no loop);
- stock:    megatron's GPTModel (local spec, 2 norms per layer) with N*T layers, for scale;
- Ouro objective: the looped model with every step's head, gate and CE (Stage I), and its time per model FLOP
  against the unrolled one (it does (T-1) more heads, so raw time is not comparable); then the same with
  activation recompute per layer and per loop pass (their extra forward is overhead, not model FLOPs).
The target is looped / unrolled <= 1.05.

Table 3 (`--pipeline`), the looped pipeline (DESIGN.md decision 3): one Stage I step (forward + backward of M
micro-batches through megatron's schedule, pipelines.training.step) at PP=1 on 1 process and PP=2 on 2 processes,
T=4, median of repeats. The bubble is measured on each rank as (step wall time - time in the schedule's
forward_step and backward_step) / that compute time, averaged over ranks (it includes p2p time), next to the
interleaved schedule's (P-1)/(M*T) and 1F1B's (P-1)/M. Two processes on a 2-core host shared with other work:
read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, overrides: list[str], out_dir: str, result_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from looplm.infra.configs import load_config
    from looplm.model.megatron import cpu_shim
    from looplm.pipelines.training.config import PretrainConfig
    from looplm.pipelines.training.trainer import train_on_rank

    cpu_shim.apply()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    config = load_config(PretrainConfig, "configs/train-tiny-cpu.yaml", overrides)
    records = train_on_rank(config, out_dir)
    if rank == 0:
        torch.save(records, result_file)
    dist.destroy_process_group()


def trainer_throughput(label: str, world: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        result = os.path.join(out, "records.pt")
        mp.spawn(_rank_main, args=(world, _free_port(), overrides, os.path.join(out, "run"), result), nprocs=world)
        records = [r for r in torch.load(result, weights_only=False) if "tokens_per_s" in r][1:]
    return {
        "label": label,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
        "tflops": statistics.median(r["model_tflops_per_s"] for r in records),
    }


def _time(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def loop_cost(preset: str, seq: int, batch: int, steps: int, repeats: int) -> list[tuple[str, float, float]]:
    """(name, median seconds per fwd+bwd, model FLOPs per token) for the four single-process variants."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    import torch.distributed as dist
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from looplm.model import LoopLMConfig
    from looplm.model.megatron import cpu_shim
    from looplm.model.megatron.config import ParallelConfig
    from looplm.model.megatron.distributed import initialize_model_parallel
    from looplm.model.megatron.model import MegatronLoopLM

    cpu_shim.apply()
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel = ParallelConfig(precision="fp32")
    initialize_model_parallel(parallel, seed=0)
    config = LoopLMConfig.preset(preset, total_ut_steps=steps)
    unrolled_config = LoopLMConfig.preset(preset, num_hidden_layers=config.num_hidden_layers * steps, total_ut_steps=1)
    looped, unrolled = MegatronLoopLM(config, parallel), MegatronLoopLM(unrolled_config, parallel)
    stock = GPTModel(
        parallel.transformer_config(unrolled_config),
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=config.vocab_size,
        max_sequence_length=seq,
        position_embedding_type="rope",
    )
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    labels = torch.randint(0, config.vocab_size, (batch, seq))
    position_ids = torch.arange(seq).expand(batch, seq)
    # An explicit mask: with None, megatron builds a default causal mask with a device="cuda" literal.
    causal_mask = torch.ones(seq, seq, dtype=torch.bool).triu(1)[None, None]

    def loop_only(model, t):
        def run():
            h = model.embed(ids)
            attention = model.attention_inputs(seq, ids.device)
            for _ in range(t):
                h = model.recurrent_step(h, attention)
            model.step_token_losses(h, labels.t().contiguous()).mean().backward()

        return run

    def stock_run():
        stock(ids, position_ids, causal_mask, labels=labels).mean().backward()

    recomputed = {
        mode: MegatronLoopLM(config, ParallelConfig(precision="fp32", recompute=mode)) for mode in ("layer", "loop")
    }

    def ouro_objective(model=looped):
        def run():
            model(ids, labels, num_steps=steps, beta=0.05).loss.backward()

        return run

    variants = {
        f"looped: {config.num_hidden_layers} layers x T={steps}": loop_only(looped, steps),
        f"unrolled: {unrolled_config.num_hidden_layers} layers x T=1": loop_only(unrolled, 1),
        f"stock GPTModel: {unrolled_config.num_hidden_layers} layers": stock_run,
        f"Ouro Stage I objective, T={steps}": ouro_objective(),
        "  the same, recompute=layer": ouro_objective(recomputed["layer"]),
        "  the same, recompute=loop": ouro_objective(recomputed["loop"]),
    }
    flops = {
        0: config.flops_per_token(seq, steps, lm_head_steps=1)["total"],
        1: unrolled_config.flops_per_token(seq, 1)["total"],
        2: unrolled_config.flops_per_token(seq, 1)["total"],
        3: config.flops_per_token(seq, steps)["total"],
        4: config.flops_per_token(seq, steps)["total"],  # recompute is overhead, not model FLOPs
        5: config.flops_per_token(seq, steps)["total"],
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):  # interleaved, so machine load affects every variant alike
        for name, fn in variants.items():
            samples[name] += _time(fn, 1)
    dist.destroy_process_group()
    return [(name, min(samples[name]), flops[i]) for i, name in enumerate(variants)]


def _pipeline_rank(rank: int, world: int, port: int, args: tuple, result_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from looplm.model import LoopLMConfig
    from looplm.model.megatron import cpu_shim
    from looplm.model.megatron.config import ParallelConfig
    from looplm.model.megatron.distributed import initialize_model_parallel, wrap_data_parallel
    from looplm.model.megatron.model import MegatronLoopLM
    from looplm.pipelines.training.step import forward_backward

    cpu_shim.apply()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # Compute time per rank: the schedule's forward_step and backward_step, timed (bench only). The rest of a
    # step's wall time on a rank is waiting for the other stages (the bubble) and p2p.
    from megatron.core.pipeline_parallel import schedules

    busy = [0.0]

    def timed(fn):
        def run(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                busy[0] += time.perf_counter() - start

        return run

    schedules.forward_step = timed(schedules.forward_step)
    schedules.backward_step = timed(schedules.backward_step)
    preset, layers, seq, micro_batch, microbatch_counts, steps, repeats = args
    parallel = ParallelConfig(pipeline_parallel=world, precision="fp32")
    initialize_model_parallel(parallel, seed=0)
    config = LoopLMConfig.preset(preset, num_hidden_layers=layers)
    ddp = wrap_data_parallel(MegatronLoopLM(config, parallel), per_token_loss=True)
    generator = torch.Generator().manual_seed(0)
    times: dict[int, list[float]] = {}
    for microbatches in microbatch_counts:
        batches = [
            (
                torch.randint(0, config.vocab_size, (micro_batch, seq), generator=generator),
                torch.randint(0, config.vocab_size, (micro_batch, seq), generator=generator),
            )
            for _ in range(microbatches)
        ]
        times[microbatches] = []
        for _ in range(repeats + 1):  # the first is warm-up
            ddp.zero_grad_buffer()
            dist.barrier()
            busy[0], start = 0.0, time.perf_counter()
            forward_backward(ddp, batches, objective="stage1", num_steps=steps, beta=0.05)
            wall = time.perf_counter() - start
            idle = torch.tensor([(wall - busy[0]) / busy[0]])  # this rank's bubble, as a share of its compute
            dist.all_reduce(idle)
            times[microbatches].append((wall, idle.item() / world))
        times[microbatches] = times[microbatches][1:]
    if rank == 0:
        torch.save(times, result_file)
    dist.destroy_process_group()


def pipeline_step_seconds(world: int, args: tuple) -> dict[int, list[float]]:
    with tempfile.TemporaryDirectory() as out:
        result = os.path.join(out, "times.pt")
        mp.spawn(_pipeline_rank, args=(world, _free_port(), args, result), nprocs=world)
        return torch.load(result)


def pipeline_table(preset: str, seq: int, micro_batch: int, repeats: int) -> None:
    layers, steps, stages, counts = 4, 4, 2, (2, 4, 8)
    print(f"\nlooped pipeline: preset {preset} with {layers} layers, T={steps}, seq {seq}, micro batch {micro_batch}")
    print(
        f"{'layout':<26}{'M':>4}{'ms/step':>10}{'tokens/s':>10}{'bubble':>9}{'interleaved':>13}{'1F1B':>7}"
        f"{'  (bubbles: idle / compute per rank)'}"
    )
    args = (preset, layers, seq, micro_batch, counts, steps, repeats)
    samples: dict[int, dict[int, list[tuple[float, float]]]] = {world: {m: [] for m in counts} for world in (1, stages)}
    for _ in range(2):  # alternate the layouts so that load changes hit both
        for world in samples:
            for microbatches, times in pipeline_step_seconds(world, args).items():
                samples[world][microbatches] += times
    for microbatches in counts:
        tokens = microbatches * micro_batch * seq
        single = statistics.median(wall for wall, _ in samples[1][microbatches])
        piped = statistics.median(wall for wall, _ in samples[stages][microbatches])
        measured = statistics.median(idle for _, idle in samples[stages][microbatches])
        for world, seconds in ((1, single), (stages, piped)):
            bubble = f"{measured:>9.3f}" if world > 1 else f"{'':>9}"
            theory = f"{(stages - 1) / (microbatches * steps):>13.3f}{(stages - 1) / microbatches:>7.3f}"
            label = f"PP={world} ({world} process{'es' if world > 1 else ''})"
            print(
                f"{label:<26}{microbatches:>4}"
                f"{seconds * 1e3:>10.1f}{tokens / seconds:>10.0f}{bubble}{theory if world > 1 else ''}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--loop-cost-only", action="store_true", help="skip the trainer table")
    parser.add_argument("--pipeline", action="store_true", help="only the looped pipeline table (PP=2 vs PP=1)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.pipeline:
        print(f"host: {os.cpu_count()} cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
        pipeline_table(args.preset, args.seq, args.micro_batch, max(3, args.repeats // 3))
        print(f"load average after: {os.getloadavg()[0]:.1f}")
        return
    common = [
        f"model.preset={args.preset}",
        f"data.seq_len={args.seq}",
        f"data.micro_batch_size={args.micro_batch}",
        f"train.steps={args.steps}",
        "train.log_interval=5",
        f"train.checkpoint_interval={args.steps}",
        "loop.recurrent_steps=[[0, 4]]",
    ]
    gb = f"data.global_batch_size={args.micro_batch}"
    dp2 = [*common, f"data.global_batch_size={2 * args.micro_batch}", "launch.data_parallel=2"]
    rows = (
        []
        if args.loop_cost_only
        else [
            trainer_throughput("TP=1 (1 process)", 1, [*common, gb]),
            trainer_throughput("TP=2 (2 processes)", 2, [*common, gb, "parallel.tensor_parallel=2"]),
            trainer_throughput(
                "TP=2 + SP (2 processes)",
                2,
                [*common, gb, "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
            ),
            trainer_throughput("DP=2 (2 processes)", 2, dp2),
            trainer_throughput("DP=2, megatron DistributedOptimizer", 2, [*dp2, "optim.implementation=megatron"]),
            trainer_throughput("DP=2, bf16 + DistributedOptimizer", 2, [*dp2, "parallel.precision=bf16"]),
        ]
    )
    print(
        f"\nhost: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"preset {args.preset}, T=4, seq {args.seq}, micro batch {args.micro_batch}, fp32 unless named, gloo\n")
    if rows:
        print(f"{'layout':<40}{'tokens/s':>12}{'model TFLOP/s':>16}")
    for row in rows:
        print(f"{row['label']:<40}{row['tokens_per_s']:>12.0f}{row['tflops']:>16.4f}")
    cost = loop_cost(args.preset, args.seq, args.micro_batch, 4, args.repeats)
    base_seconds, base_flops = cost[1][1], cost[1][2]
    print(f"\n{'fwd+bwd, 1 process':<44}{'ms':>9}{'vs unrolled':>13}{'per FLOP vs unrolled':>22}")
    for name, seconds, flops in cost:
        per_flop = (seconds / flops) / (base_seconds / base_flops)
        print(f"{name:<44}{seconds * 1e3:>9.1f}{seconds / base_seconds:>13.3f}{per_flop:>22.3f}")


if __name__ == "__main__":
    main()
