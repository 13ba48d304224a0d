"""The per-rank pretraining loop of the Megatron LoopLM. Every rank of a TP x DP group runs `train_on_rank`.

One optimizer step: `accumulation_steps` micro-batches forward/backward through Megatron DDP (fp32 main_grad
buffers), `finalize_model_grads` (DP average or reduce-scatter, TP all-reduce of sequence-parallel norm gains),
the global grad norm over unique shards, a non-finite check agreed by all ranks (skip and count; K in a row
abort), clipping, then AdamW (megatron-core's distributed optimizer, or torch AdamW on CPU: optimizer.py).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads

from looplm.model import IGNORE_INDEX
from looplm.model.megatron import checkpointing
from looplm.model.megatron.distributed import initialize_model_parallel, wrap_data_parallel
from looplm.model.megatron.model import MegatronLoopLM

from . import optimizer as optim_lib
from .config import PretrainConfig
from .data import micro_batch, prepare_data
from .schedules import beta_at, global_batch_sizes, lr_at, recurrent_steps_at

HF_EXPORT = "hf"
RUN_INFO = "run_info.json"


class NonFiniteLossError(RuntimeError):
    """K optimizer steps in a row had a non-finite loss or gradient norm."""


def _all_finite(*values: torch.Tensor) -> bool:
    flag = torch.tensor(float(all(bool(torch.isfinite(v).all()) for v in values)))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def _dp_sum(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().clone().float()
    dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
    return tensor


def _dp_mean(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().clone().float()
    dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
    return tensor / parallel_state.get_data_parallel_world_size()


def train_on_rank(
    config: PretrainConfig,
    output: str | Path,
    report: Callable[[dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
) -> list[dict[str, Any]]:
    """Train (resuming from output/checkpoints/latest if present) on an initialised process group.

    At the end the model is also written in the Ouro HF layout to output/hf. Returns the logged records (every
    rank returns the same figures). `report` is called with each record on every rank (Ray Train wants every
    worker to report). `stop_after` ends the run after that many steps without a final checkpoint, like a
    crash (tests of resume).
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
        checkpointing.import_hf(model, config.train.init_from_hf)
    if config.train.objective == "stage2":
        for param in model.lm_parameters():
            param.requires_grad_(False)
    ddp = wrap_data_parallel(model, use_distributed_optimizer=optim_lib.uses_distributed_optimizer(config))
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
    folder = checkpointing.latest(ckpt_root)
    if folder is not None:
        saved_with = json.loads((folder / "trainer.json").read_text()).get("optimizer", "torch-adamw")
        if saved_with != info["optimizer"]:
            raise ValueError(
                f"{folder} holds {saved_with} optimizer state but this run steps with {info['optimizer']}; "
                f"resume with the same optim.implementation / optim.distributed, or start a new output folder"
            )
        record = checkpointing.load(folder, model, optimizer)
        start, skipped = record["step"], record.get("skipped_steps", 0)

    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    device = next(model.parameters()).device
    seq = config.data.seq_len
    per_micro = config.data.micro_batch_size * dp_size
    records: list[dict[str, Any]] = []
    in_a_row, interval_start, interval_tokens = 0, time.perf_counter(), 0
    model.train()
    for step in range(start, config.train.steps):
        if stop_after is not None and step >= stop_after:
            return records
        lr = lr_at(step, config.optim, config.train.steps)
        steps_t, beta = recurrent_steps_at(step, config.loop), beta_at(step, config.loop)
        ddp.zero_grad_buffer()
        optimizer.zero_grad(set_to_none=True)
        batches = [
            micro_batch(train_data, first_samples[step], micro, config.data, dp_rank, dp_size)
            for micro in range(batch_sizes[step] // per_micro)
        ]
        batches = [(ids.to(device), labels.to(device)) for ids, labels in batches]
        # The step's loss is the mean over every counted token of the global batch, however they fall across
        # micro-batches and DP ranks: each micro-batch's mean is weighted by its share of the tokens (times the
        # DP size, because Megatron DDP averages gradients over DP ranks).
        counted = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in batches)
        total_tokens = _dp_sum(torch.tensor(float(counted), device=device))
        outs, token_loss = [], torch.zeros((), device=device)
        for ids, labels in batches:
            out = ddp(ids, labels, objective=config.train.objective, num_steps=steps_t, beta=beta)
            (out.loss * (out.num_tokens * dp_size / total_tokens)).backward()
            token_loss += out.loss.detach().float() * out.num_tokens
            outs.append(out)
        finalize_model_grads([ddp])
        loss = _dp_sum(token_loss) / total_tokens
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
                    "loss": loss.item(),
                    "grad_norm": norm.item(),
                    "lr": lr,
                    "beta": beta,
                    "recurrent_steps": steps_t,
                    "global_batch_size": batch_sizes[step],
                    "tokens_seen": first_samples[done] * seq,  # to compare runs whose batch sizes differ
                    "entropy": _dp_mean(torch.stack([o.entropy for o in outs]).mean()).item(),
                    "skipped_steps": skipped,
                    "tokens_per_s": tokens_per_s,
                    "model_tflops_per_s": tokens_per_s * flops / 1e12,
                    **_per_step("ce_step", _dp_mean(torch.stack([o.ce_per_step for o in outs]).mean(0))),
                    **_per_step("exit_prob_step", _dp_mean(torch.stack([o.exit_probs_mean for o in outs]).mean(0))),
                }
            )
            if report is not None:
                report(records[-1])
            interval_start, interval_tokens = time.perf_counter(), 0
        if done % config.train.checkpoint_interval == 0 or done == config.train.steps:
            saving = time.perf_counter()
            checkpointing.save(
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
        if report is not None:
            report(records[-1])
    # The trained model in the Ouro HF layout: what Stage II, evaluation and serving load.
    checkpointing.export_hf(model, model_config, output / HF_EXPORT)
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


def _per_step(prefix: str, values: torch.Tensor) -> dict[str, float]:
    return {f"{prefix}_{t + 1}": v for t, v in enumerate(values.tolist())}


@torch.no_grad()
def validation_loss(ddp: torch.nn.Module, valid_data, config: PretrainConfig, batches: int = 2) -> float:
    """Stage I loss at the final T over the first `batches` global batches of the valid split."""
    steps_t = recurrent_steps_at(config.train.steps - 1, config.loop)
    beta = beta_at(config.train.steps - 1, config.loop)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    device = next(ddp.parameters()).device
    losses = []
    for step in range(batches):
        for micro in range(config.accumulation_steps):
            first = step * config.data.global_batch_size
            ids, labels = micro_batch(valid_data, first, micro, config.data, dp_rank, dp_size)
            ids, labels = ids.to(device), labels.to(device)
            losses.append(ddp(ids, labels, objective="stage1", num_steps=steps_t, beta=beta).loss)
    value = _dp_mean(torch.stack(losses).mean()).item()
    return value if math.isfinite(value) else float("nan")
