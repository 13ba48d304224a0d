"""The per-rank pretraining loop of the Megatron LoopLM. Every rank of a TP x PP x DP group runs `train_on_rank`.

One optimizer step: the step's micro-batches forward/backward through megatron-core's pipeline schedule
(step.py: `get_forward_backward_func`, Megatron DDP's fp32 main_grad buffers, `finalize_model_grads`: DP sum or
reduce-scatter, TP all-reduce of sequence-parallel norm gains, division by the global token count), the global
grad norm over unique shards of every TP x PP x DP group, a non-finite check agreed by all ranks (skip and
count; K in a row abort), clipping, then AdamW (megatron-core's distributed optimizer, or torch AdamW on CPU:
optimizer.py). Checkpoints: checkpoints.py.
LR, beta and T come from pure schedules of the step, data from the step's sample indices, so a run resumed
from a checkpoint (model, optimizer state, RNG, step) repeats the uninterrupted run exactly.

What actually ran (optimizer, parameter dtype, layer implementation, device, versions) is written to
`<output>/run_info.json`, since "auto" choices resolve only on the workers.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from looplm.model.megatron.checkpointing import export_hf, import_hf
from looplm.model.megatron.distributed import initialize_model_parallel, wrap_data_parallel
from looplm.model.megatron.model import MegatronLoopLM

from . import checkpoints
from . import optimizer as optim_lib
from .config import PretrainConfig
from .data import micro_batch, prepare_data
from .schedules import beta_at, global_batch_sizes, lr_at, probe_seed_at, recurrent_steps_at, training_steps_at
from .step import forward_backward, step_figures

Callback = Callable[[dict[str, Any]], None]

HF_EXPORT = "hf"
RUN_INFO = "run_info.json"


class NonFiniteLossError(RuntimeError):
    """K optimizer steps in a row had a non-finite loss or gradient norm."""


def _all_finite(*values: torch.Tensor) -> bool:
    flag = torch.tensor(float(all(bool(torch.isfinite(v).all()) for v in values)))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def train_on_rank(
    config: PretrainConfig, output: str | Path, callbacks: Sequence[Callback] = ()
) -> list[dict[str, Any]]:
    """Train (resuming from output/checkpoints/latest if present) on an initialised process group.

    At the end the model is also written in the Ouro HF layout to output/hf. Returns the logged records (every
    rank returns the same figures). Each callback is called with each record on every rank, in order (Ray Train
    wants every worker to report); an exception from a callback ends the run there, like a crash.
    """
    output = Path(output)
    if dist.get_world_size() != config.world_size:
        raise ValueError(
            f"the config needs {config.world_size} ranks (TP x PP x DP), the process group has {dist.get_world_size()}"
        )
    torch.manual_seed(config.train.seed)
    initialize_model_parallel(config.parallel, seed=config.train.seed)
    model_config = config.model.build()
    model = MegatronLoopLM(model_config, config.parallel, seed=config.train.seed)
    if config.train.init_from_hf:
        import_hf(model, config.train.init_from_hf)
    if config.train.objective == "stage2":
        for param in model.lm_parameters():
            param.requires_grad_(False)
    ddp = wrap_data_parallel(
        model, use_distributed_optimizer=optim_lib.uses_distributed_optimizer(config), per_token_loss=True
    )
    optimizer = optim_lib.build_optimizer(model, ddp, config)
    info = run_info(config, model)
    if dist.get_rank() == 0:
        output.mkdir(parents=True, exist_ok=True)
        (output / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    batch_sizes = global_batch_sizes(config.data, config.launch.data_parallel, config.train.steps)
    first_samples = [0, *itertools.accumulate(batch_sizes)]  # the global batch of step s starts at first_samples[s]
    train_data, valid_data = prepare_data(config, output, model_config.vocab_size, first_samples[-1])

    ckpt_root = output / "checkpoints"
    start, skipped = 0, 0
    folder = checkpoints.latest(ckpt_root)
    if folder is not None:
        saved_with = json.loads((folder / "trainer.json").read_text()).get("optimizer", "torch-adamw")
        if saved_with != info["optimizer"]:
            raise ValueError(
                f"{folder} holds {saved_with} optimizer state but this run steps with {info['optimizer']}; "
                f"resume with the same optim.implementation / optim.distributed, or start a new output folder"
            )
        record = checkpoints.load(folder, model, optimizer)
        start, skipped = record["step"], record.get("skipped_steps", 0)
        if dist.get_rank() == 0:
            print(f"resuming from {folder} at step {start} of {config.train.steps}", flush=True)

    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    device = next(model.parameters()).device
    seq = config.data.seq_len
    per_micro = config.data.micro_batch_size * dp_size
    records: list[dict[str, Any]] = []
    in_a_row, interval_start, interval_tokens = 0, time.perf_counter(), 0
    model.train()
    for step in range(start, config.train.steps):
        lr = lr_at(step, config.optim, config.train.steps)
        steps_t, beta = training_steps_at(step, config.loop, config.train.seed), beta_at(step, config.loop)
        ddp.zero_grad_buffer()
        optimizer.zero_grad(set_to_none=True)
        batches = [
            micro_batch(train_data, first_samples[step], micro, config.data, dp_rank, dp_size)
            for micro in range(batch_sizes[step] // per_micro)
        ]
        batches = [(ids.to(device), labels.to(device)) for ids, labels in batches]
        figures = forward_backward(
            ddp,
            batches,
            objective=config.train.objective,
            num_steps=steps_t,
            beta=beta,
            contraction_penalty=config.loop.contraction_penalty,
            kv_consistency=config.loop.kv_consistency,
            probe_seed=probe_seed_at(step, config.train.seed, dp_rank),
        )
        figures = step_figures(figures, len(batches), steps_t)
        loss = torch.tensor(figures["loss"])
        norm = optim_lib.gradient_norm(optimizer, model)
        if not _all_finite(loss, norm):
            skipped, in_a_row = skipped + 1, in_a_row + 1
            if in_a_row >= config.train.max_nonfinite_in_a_row:
                raise NonFiniteLossError(
                    f"{in_a_row} steps in a row had a non-finite loss or gradient norm (last: step {step}, "
                    f"loss {loss.item()}, grad norm {norm.item()}); aborting. Lower optim.lr or check the data."
                )
            continue
        in_a_row = 0
        optim_lib.set_lr(optimizer, lr, config.optim.weight_decay)
        optim_lib.step(optimizer, model, norm.item(), config.optim.grad_clip)
        interval_tokens += batch_sizes[step] * seq

        done = step + 1
        if done % config.train.log_interval == 0 or done == config.train.steps:
            elapsed = time.perf_counter() - interval_start
            tokens_per_s = interval_tokens / elapsed
            flops = model_config.flops_per_token(seq, num_steps=steps_t)["total"]
            if config.train.objective == "stage2":  # the LM runs forward only; the gate's backward is negligible
                flops = model_config.flops_per_token(seq, num_steps=steps_t)["forward"]
            records.append(
                {
                    "step": done,
                    "loss": figures["loss"],
                    "grad_norm": norm.item(),
                    "lr": lr,
                    "beta": beta,
                    "recurrent_steps": steps_t,
                    "global_batch_size": batch_sizes[step],
                    "tokens_seen": first_samples[done] * seq,  # to compare runs whose batch sizes differ
                    "entropy": figures["entropy"],
                    "skipped_steps": skipped,
                    "tokens_per_s": tokens_per_s,
                    "model_tflops_per_s": tokens_per_s * flops / 1e12,
                    **_per_step("ce_step", figures["ce_per_step"]),
                    **_per_step("exit_prob_step", figures["exit_probs"]),
                    **_penalty_figures(figures, config),
                }
            )
            for callback in callbacks:
                callback(records[-1])
            interval_start, interval_tokens = time.perf_counter(), 0
        if done % config.train.checkpoint_interval == 0 or done == config.train.steps:
            saving = time.perf_counter()
            checkpoints.save(
                ckpt_root,
                done,
                model,
                optimizer,
                {"skipped_steps": skipped, "optimizer": info["optimizer"]},
                keep=config.train.keep_checkpoints,
            )
            interval_start += time.perf_counter() - saving  # checkpoint time is not training throughput
    if start < config.train.steps or not records:
        records.append({"step": config.train.steps, "valid_loss": validation_loss(ddp, valid_data, config)})
        for callback in callbacks:
            callback(records[-1])
    # The trained model in the Ouro HF layout: what Stage II, evaluation and serving load.
    export_hf(model, model_config, output / HF_EXPORT)
    return records


def run_info(config: PretrainConfig, model: torch.nn.Module) -> dict[str, Any]:
    """What this run resolved to on its workers: recorded with the run (MLflow tags) and beside its checkpoints."""
    from importlib.metadata import version

    param = next(model.parameters())
    return {
        "optimizer": optim_lib.describe(config),
        "params_dtype": str(param.dtype).removeprefix("torch."),
        "transformer_impl": config.parallel.transformer_impl,
        "device": param.device.type,
        "world_size": dist.get_world_size(),
        "megatron_core": version("megatron-core"),
        "torch": torch.__version__,
    }


def _penalty_figures(figures: dict[str, Any], config: PretrainConfig) -> dict[str, float]:
    """The loop-robust terms that are switched on, as `contraction` and `kv_consistency` (unweighted)."""
    return {name: figures[name] for name in ("contraction", "kv_consistency") if config.loop.penalties_on(name)}


def _per_step(prefix: str, values: list[float]) -> dict[str, float]:
    return {f"{prefix}_{t + 1}": v for t, v in enumerate(values)}


@torch.no_grad()
def validation_loss(ddp: torch.nn.Module, valid_data, config: PretrainConfig, batches: int = 2) -> float:
    """Stage I loss at the final T over the first `batches` global batches of the valid split: the mean over
    their counted tokens, through the same schedule (forward only)."""
    steps_t = recurrent_steps_at(config.train.steps - 1, config.loop)
    beta = beta_at(config.train.steps - 1, config.loop)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    device = next(ddp.parameters()).device
    micro_batches = []
    for step in range(batches):
        for micro in range(config.accumulation_steps):
            first = step * config.data.global_batch_size
            ids, labels = micro_batch(valid_data, first, micro, config.data, dp_rank, dp_size)
            micro_batches.append((ids.to(device), labels.to(device)))
    figures = forward_backward(ddp, micro_batches, objective="stage1", num_steps=steps_t, beta=beta, forward_only=True)
    value = step_figures(figures, len(micro_batches), steps_t)["loss"]
    return value if math.isfinite(value) else float("nan")
