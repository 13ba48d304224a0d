"""Learning-rate, beta, recurrent-step and batch-size schedules: pure functions of the optimizer step (so resume
is exact)."""

from __future__ import annotations

import math
import random

from .config import DataConfig, LoopSchedule, OptimConfig


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """The LR of optimizer step `step` (0-based).

    warmup_constant: linear warmup to lr, then lr (Ouro Stage 1a/1b, 3).
    wsd: warmup, lr until the last decay_steps, then linear decay to min_lr (warmup-stable-decay).
    cosine: warmup, then cosine from lr to min_lr over the remaining (or decay_steps) steps (Ouro Stage 2, 4).
    """
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "warmup_constant":
        return optim.lr
    if optim.schedule == "wsd":
        decay_start = total_steps - optim.decay_steps
        if step < decay_start or optim.decay_steps == 0:
            return optim.lr
        progress = (step - decay_start + 1) / optim.decay_steps
        return optim.lr + (optim.min_lr - optim.lr) * min(1.0, progress)
    span = optim.decay_steps or max(1, total_steps - optim.warmup_steps - 1)  # min_lr at the last step
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr + (optim.lr - optim.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def piecewise(step: int, table: tuple[tuple[int, float], ...]) -> float:
    value = table[0][1]
    for start, entry in table:
        if step >= start:
            value = entry
    return value


def recurrent_steps_at(step: int, loop: LoopSchedule) -> int:
    return int(piecewise(step, loop.recurrent_steps))


def drawn_recurrent_steps(step: int, low: int, high: int, seed: int) -> int:
    """loop.random_steps: optimizer step `step`'s T, uniform on low..high inclusive, from a generator seeded by
    (seed, step) alone. Both trainers draw the same T for the same seed; a resumed run redraws the same T; and
    the draw does not consume the run's data generator, so the batches are those of a fixed-T run."""
    return random.Random(f"looplm.random_steps:{seed}:{step}").randint(low, high)


def training_steps_at(step: int, loop: LoopSchedule, seed: int) -> int:
    """The T a training step runs: drawn from loop.random_steps when set, else loop.recurrent_steps."""
    if loop.random_steps is not None:
        return drawn_recurrent_steps(step, *loop.random_steps, seed)
    return recurrent_steps_at(step, loop)


def probe_seed_at(step: int, seed: int, rank: int = 0) -> int:
    """The seed of the contraction probe of `step` on data-parallel rank `rank` (micro-batch m adds m)."""
    return random.Random(f"looplm.contraction_probe:{seed}:{step}:{rank}").getrandbits(40)


def beta_at(step: int, loop: LoopSchedule) -> float:
    return float(piecewise(step, loop.beta))


def global_batch_sizes(data: DataConfig, data_parallel: int, steps: int) -> list[int]:
    """The global batch (sequences) of every optimizer step: data.global_batch_size, or its ramp-up.

    The ramp is megatron-core's RampupBatchsizeNumMicroBatchesCalculator, i.e. Megatron-LM's --rampup-batch-size:
    the batch of a step is set by the samples consumed before it.
    """
    if data.rampup_batch_size is None:
        return [data.global_batch_size] * steps
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

    start, increment, ramp_samples = data.rampup_batch_size
    calculator = RampupBatchsizeNumMicroBatchesCalculator(
        global_batch_size=data.global_batch_size,
        micro_batch_size=data.micro_batch_size,
        data_parallel_size=data_parallel,
        decrease_batch_size_if_needed=False,
        rank=0,
        start_global_batch_size=start,
        batch_size_increment=increment,
        ramup_samples=ramp_samples,
    )
    sizes, consumed = [], 0
    for _ in range(steps):
        calculator.update(consumed, consistency_check=True)
        sizes.append(calculator.get_current_global_batch_size())
        consumed += sizes[-1]
        if consumed > ramp_samples:  # the ramp is over: the rest is the full batch
            sizes += [data.global_batch_size] * (steps - len(sizes))
            break
    return sizes
