"""Bodies of the multi-process tests; each runs on every gloo rank (see _mcore_spawn.run_ranks) and returns figures.

The reference is always the single-process `looplm.model.LoopLM` with `objectives.stage1_loss/stage2_loss`,
built from the same seed on every rank, so each rank can compare against it without any file passing.
"""

from __future__ import annotations

import contextlib

import torch

BETA = 0.05
STEPS = 3


def reference_and_batch(seed: int = 0, batch: int = 2, seq: int = 16):
    from looplm.model import LoopLM, LoopLMConfig

    config = LoopLMConfig.preset("tiny")
    torch.manual_seed(seed)
    reference = LoopLM(config)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    labels = torch.randint(0, config.vocab_size, (batch, seq))
    labels[:, :3] = -100  # the same count per row, so DP's mean of per-rank means is the global mean
    return config, reference, ids, labels


def relative_errors(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor ||g - g_ref|| / ||g_ref|| (0 where the reference gradient is exactly zero and so is g)."""
    out = {}
    for name, ref in reference.items():
        diff = (grads[name].float() - ref.float()).norm().item()
        scale = ref.float().norm().item()
        out[name] = diff / scale if scale > 0 else diff
    return out


def _megatron_step(config, checkpoint, ids, labels, parallel, objective: str):
    """Build at `parallel`, load the reference's Ouro HF checkpoint, one forward/backward through Megatron DDP;
    returns (mean loss over DP, unsharded Ouro-named gradients, LossOutput)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    from looplm.model.megatron.checkpointing import import_hf
    from looplm.model.megatron.convert import gather_tensor_parallel, local_state, megatron_to_hf
    from looplm.model.megatron.distributed import initialize_model_parallel, wrap_data_parallel
    from looplm.model.megatron.model import MegatronLoopLM

    initialize_model_parallel(parallel, seed=7)
    model = MegatronLoopLM(config, parallel, seed=7)
    import_hf(model, checkpoint)
    if objective == "stage2":
        for param in model.lm_parameters():
            param.requires_grad_(False)
    ddp = wrap_data_parallel(model)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    rows = slice(dp_rank * ids.shape[0] // dp, (dp_rank + 1) * ids.shape[0] // dp)
    ddp.zero_grad_buffer()
    out = ddp(ids[rows], labels[rows], objective=objective, num_steps=STEPS, beta=BETA)
    out.loss.backward()
    finalize_model_grads([ddp])
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    grads = megatron_to_hf(gather_tensor_parallel(local_state(model, grads=True)), config)
    return (loss / dp).item(), grads, out


def parity(rank: int, world_size: int, cases: list[tuple[int, bool]], root: str, recompute: str = "none") -> dict:
    """For each (tensor_parallel, sequence_parallel) case, Stage I and Stage II against the reference, the
    Megatron model loading the reference's saved Ouro HF checkpoint (with activation recompute `recompute`)."""
    from looplm.model.megatron.config import ParallelConfig
    from looplm.model.objectives import stage1_loss, stage2_loss

    results = {}
    for tp, sp in cases:
        for objective in ("stage1", "stage2"):
            config, reference, ids, labels = reference_and_batch()
            if objective == "stage1":
                ref_out = stage1_loss(reference, ids, labels, beta=BETA, num_steps=STEPS)
            else:
                ref_out = stage2_loss(reference, ids, labels, num_steps=STEPS)
            ref_out.loss.backward()
            ref_grads = {
                n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in reference.named_parameters()
            }
            checkpoint = reference.save_pretrained(f"{root}/reference-rank{rank}", overwrite=True)
            parallel = ParallelConfig(tensor_parallel=tp, sequence_parallel=sp, recompute=recompute)
            loss, grads, out = _megatron_step(config, checkpoint, ids, labels, parallel, objective)
            errors = relative_errors(grads, ref_grads)
            results[(tp, sp, objective)] = {
                "loss": loss,
                "ref_loss": ref_out.loss.item(),
                "max_grad_rel_err": max(errors.values()),
                "worst": max(errors, key=errors.get),
                "nonzero_lm_grads": sum(int(g.abs().sum() > 0) for n, g in grads.items() if "early_exit_gate" not in n),
                "ce_per_step": out.ce_per_step.tolist() if world_size // tp == 1 else None,
                "ref_ce_per_step": ref_out.ce_per_step.tolist(),
            }
    return results


def _stage1_loss(model, ids, labels) -> float:
    with torch.no_grad():
        return model(ids, labels, num_steps=STEPS, beta=BETA).loss.item()


def resharding(rank: int, world_size: int, root: str) -> dict:
    """Save at TP=1 (DP=2), load at TP=2, save at TP=2, load at TP=1; export to Ouro HF and back."""
    from pathlib import Path

    from looplm.model import LoopLM
    from looplm.model.megatron import checkpointing
    from looplm.model.megatron.config import ParallelConfig
    from looplm.model.megatron.convert import gather_tensor_parallel, hf_to_megatron, local_state, megatron_to_hf, shard
    from looplm.model.megatron.distributed import initialize_model_parallel
    from looplm.model.megatron.model import MegatronLoopLM
    from looplm.model.objectives import stage1_loss

    config, reference, ids, labels = reference_and_batch()
    with torch.no_grad():
        ref_loss = stage1_loss(reference, ids, labels, beta=BETA, num_steps=STEPS).loss.item()
    ref_state = reference.state_dict()

    def build(tp: int, seed: int):
        parallel = ParallelConfig(tensor_parallel=tp)
        initialize_model_parallel(parallel, seed=seed)
        return MegatronLoopLM(config, parallel, seed=seed)

    def matches_reference(model) -> bool:
        state = megatron_to_hf(gather_tensor_parallel(local_state(model)), config)
        return all(torch.equal(state[name], ref_state[name]) for name in ref_state)

    out = {}
    tp1 = build(1, seed=11)
    tp1.load_state_dict(shard(hf_to_megatron(ref_state, config), 1, 0), strict=True)
    checkpointing.save_model(tp1, Path(root) / "tp1")

    tp2 = build(2, seed=12)
    out["tp2_before_load_equal"] = matches_reference(tp2)
    checkpointing.load_model(tp2, Path(root) / "tp1")
    out["tp1_to_tp2_exact"] = matches_reference(tp2)
    out["tp2_loss"], out["ref_loss"] = _stage1_loss(tp2, ids, labels), ref_loss
    checkpointing.save_model(tp2, Path(root) / "tp2")
    hf_dir = checkpointing.export_hf(tp2, config, Path(root) / "hf")

    tp1b = build(1, seed=13)
    checkpointing.load_model(tp1b, Path(root) / "tp2")
    out["tp2_to_tp1_exact"] = matches_reference(tp1b)
    out["tp1_loss"] = _stage1_loss(tp1b, ids, labels)

    tp2b = build(2, seed=14)
    checkpointing.import_hf(tp2b, Path(root) / "hf")
    out["hf_to_tp2_exact"] = matches_reference(tp2b)
    if rank == 0:
        exported = LoopLM.from_pretrained(hf_dir).state_dict()
        out["hf_file_exact"] = all(torch.equal(exported[n], ref_state[n]) for n in ref_state)
    return out


class Crash(Exception):
    """What `crash_after` raises: the run ends there, without a final checkpoint, as a killed job would."""


def crash_after(step: int, logged: list):
    """A trainer callback that keeps every logged record and ends the run once step `step` is logged."""

    def callback(record: dict) -> None:
        logged.append(record)
        if record.get("step", 0) >= step and "loss" in record:
            raise Crash(f"crashed after step {step}")

    return callback


def train(rank: int, world_size: int, runs: list[tuple]) -> list[list]:
    """Training runs one after another on this gloo group (no Ray): each (config, output, crash_after_step)
    through pipelines.training.trainer.train_on_rank; one process start-up for all of them. A run with
    crash_after_step ends after that step (its records so far are returned); its checkpoints stay."""
    from looplm.pipelines.training.trainer import train_on_rank

    results = []
    for config, output, stop_after in runs:
        if stop_after is None:
            results.append(train_on_rank(config, output))
            continue
        logged: list = []
        with contextlib.suppress(Crash):
            train_on_rank(config, output, callbacks=[crash_after(stop_after, logged)])
        results.append(logged)
    return results


def train_with_poisoned_steps(rank: int, world_size: int, config, output: str, poisoned: list[int]) -> list:
    """A clean run and a run whose loss is NaN at the given 0-based optimizer steps (the model's forward is
    wrapped in this process only), one after the other: (clean records, poisoned records)."""
    from looplm.model.megatron.model import MegatronLoopLM
    from looplm.pipelines.training.trainer import train_on_rank

    clean = train_on_rank(config, output + "-clean")
    original, calls = MegatronLoopLM.forward, [0]

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        step = calls[0] // config.accumulation_steps
        calls[0] += 1
        if self.training and step in poisoned:
            out.loss = out.loss * float("nan")
        return out

    MegatronLoopLM.forward = forward
    try:
        return [clean, train_on_rank(config, output + "-poisoned")]
    finally:
        MegatronLoopLM.forward = original


def train_with_uneven_labels(rank: int, world_size: int, config, output: str) -> list:
    """One run in which a sample-dependent share of labels is ignored, so micro-batches and DP ranks count
    different numbers of tokens (the data layout decides who gets which sample, not what is masked)."""
    from looplm.model import IGNORE_INDEX
    from looplm.pipelines.training import trainer

    original = trainer.micro_batch

    def masked(*args, **kwargs):
        ids, labels = original(*args, **kwargs)
        # Mask more of a sample the larger its first token: counts vary from sample to sample.
        keep = torch.arange(labels.shape[1])[None] < 4 + (ids[:, :1] % (labels.shape[1] - 4))
        return ids, labels.masked_fill(~keep, IGNORE_INDEX)

    trainer.micro_batch = masked
    try:
        return trainer.train_on_rank(config, output)
    finally:
        trainer.micro_batch = original


def train_expecting_error(rank: int, world_size: int, config, output: str) -> str:
    from looplm.pipelines.training.trainer import train_on_rank

    try:
        train_on_rank(config, output)
    except Exception as err:  # the message is what the test checks
        return f"{type(err).__name__}: {err}"
    return "no error"


def saved_logit_tensors(rank: int, world_size: int) -> dict:
    """Stage I forward under a saved-tensors hook: how many tensors autograd keeps with a vocabulary-sized last dim."""
    from looplm.model.megatron.config import ParallelConfig
    from looplm.model.megatron.distributed import initialize_model_parallel
    from looplm.model.megatron.model import MegatronLoopLM

    config, _, ids, labels = reference_and_batch()
    initialize_model_parallel(ParallelConfig(), seed=0)
    model = MegatronLoopLM(config, ParallelConfig())
    kept: list[tuple[int, ...]] = []

    def pack(tensor):
        if tensor.dim() >= 2 and tensor.shape[-1] == config.vocab_size and tensor.numel() >= ids.numel() * 8:
            kept.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels, num_steps=4, beta=BETA)
    logits_kept_by_checkpointed_head = len(kept)
    out.loss.backward()
    # Without checkpointing every step's [seq, batch, vocab] logits would be saved: the control.
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = model.recurrent_step(model.embed(ids), model.attention_inputs(ids.shape[1], ids.device))
        model._head_cross_entropy(h, labels.t().contiguous().clamp_min(0), labels.t() < 0).sum()
    return {"checkpointed": logits_kept_by_checkpointed_head, "control": len(kept)}


def activation_bytes(rank: int, world_size: int, modes: list[str], steps: int = 4) -> dict:
    """Bytes of non-parameter tensors autograd keeps for backward after a Stage I forward, per recompute mode."""
    from looplm.model.megatron.config import ParallelConfig
    from looplm.model.megatron.distributed import initialize_model_parallel
    from looplm.model.megatron.model import MegatronLoopLM

    config, _, ids, labels = reference_and_batch(batch=2, seq=64)
    out = {}
    for mode in modes:
        parallel = ParallelConfig(recompute=mode)
        initialize_model_parallel(parallel, seed=0)
        model = MegatronLoopLM(config, parallel)
        params = {p.data_ptr() for p in model.parameters()}
        kept: dict[int, int] = {}

        def pack(tensor, params=params, kept=kept):
            if tensor.data_ptr() not in params:
                kept[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels, num_steps=steps, beta=BETA).loss
        loss.backward()
        out[mode] = sum(kept.values())
    return out


def pipeline_reference_and_batch(layers: int = 4, batch: int = 8, seq: int = 16, reinject: bool = False):
    """The reference with `layers` layers (PP=4 needs 4) and a batch of `batch` sequences."""
    from looplm.model import LoopLM, LoopLMConfig

    config = LoopLMConfig.preset("tiny", num_hidden_layers=layers, reinject_embedding=reinject)
    torch.manual_seed(3)
    reference = LoopLM(config)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    labels = torch.randint(0, config.vocab_size, (batch, seq))
    labels[:, :3] = -100
    return config, reference, ids, labels


def pipeline_parity(
    rank: int,
    world_size: int,
    cases: list[tuple[int, int, bool]],
    root: str,
    steps: int = 4,
    micro_batch: int = 1,
    reinject: bool = False,
) -> dict:
    """For each (tensor_parallel, pipeline_parallel, sequence_parallel) case (DP = the rest of the world), one
    Stage I forward/backward of the batch through the trainer's schedule step (pipelines.training.step) against
    the single-process reference: loss, per-step CE and exit probabilities, and every gradient."""
    from megatron.core import parallel_state

    from looplm.model.megatron.checkpointing import import_hf
    from looplm.model.megatron.config import ParallelConfig
    from looplm.model.megatron.convert import (
        gather_pipeline_parallel,
        gather_tensor_parallel,
        local_state,
        megatron_to_hf,
    )
    from looplm.model.megatron.distributed import initialize_model_parallel, wrap_data_parallel
    from looplm.model.megatron.model import MegatronLoopLM
    from looplm.model.objectives import stage1_loss
    from looplm.pipelines.training.step import forward_backward, step_figures

    results = {}
    for tp, pp, sp in cases:
        config, reference, ids, labels = pipeline_reference_and_batch(reinject=reinject)
        ref_out = stage1_loss(reference, ids, labels, beta=BETA, num_steps=steps)
        ref_out.loss.backward()
        ref_grads = {n: p.grad for n, p in reference.named_parameters()}
        checkpoint = reference.save_pretrained(f"{root}/reference-rank{rank}", overwrite=True)
        parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=sp)
        initialize_model_parallel(parallel, seed=7)
        model = MegatronLoopLM(config, parallel, seed=7)
        import_hf(model, checkpoint)
        ddp = wrap_data_parallel(model, per_token_loss=True)
        dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        rows = ids.shape[0] // dp
        mine = range(dp_rank * rows, (dp_rank + 1) * rows)
        batches = [
            (ids[i : i + micro_batch], labels[i : i + micro_batch]) for i in range(mine.start, mine.stop, micro_batch)
        ]
        ddp.zero_grad_buffer()
        figures = step_figures(
            forward_backward(ddp, batches, objective="stage1", num_steps=steps, beta=BETA), len(batches), steps
        )
        grads = megatron_to_hf(gather_pipeline_parallel(gather_tensor_parallel(local_state(model, grads=True))), config)
        errors = relative_errors(grads, ref_grads)
        results[(tp, pp, sp)] = {
            "loss": figures["loss"],
            "ref_loss": ref_out.loss.item(),
            "tokens": figures["tokens"],
            "ref_tokens": ref_out.num_tokens,
            "max_grad_rel_err": max(errors.values()),
            "worst": max(errors, key=errors.get),
            "grad_names": sorted(grads) == sorted(ref_grads),
            "ce_per_step": figures["ce_per_step"] if rows == ids.shape[0] else None,
            "ref_ce_per_step": ref_out.ce_per_step.tolist(),
            "naive_loss": naive_per_stage_loop_loss(reference, ids, labels, pp, steps) if pp > 1 else None,
        }
    return results


def naive_per_stage_loop_loss(reference, ids, labels, stages: int, steps: int) -> float:
    """Stage I loss of the naive pipeline: each stage loops its own layers T times, (L0 L1)xT -> (L2 L3)xT, the
    final norm, head and gate after each of the last stage's loops. Not the LoopLM; what the parity test rejects."""
    from looplm.model import LoopLM
    from looplm.model.looplm import LoopLMOutput, exit_distribution, positions_and_mask
    from looplm.model.objectives import stage1_loss

    class NaivePipelineLoop(LoopLM):
        def forward(
            self, input_ids, num_steps=None, *, attention_mask=None, return_logits=True, return_kv=False, probe=None
        ):
            h = self.model.embed_tokens(input_ids)
            positions, mask = positions_and_mask(attention_mask, *input_ids.shape, input_ids.device)
            cos, sin = self.rope(positions, h.dtype)
            per_stage = len(self.model.layers) // stages
            states = []
            for stage in range(stages):
                for _ in range(num_steps):
                    for layer in self.model.layers[stage * per_stage : (stage + 1) * per_stage]:
                        h, _ = layer(h, cos, sin, mask, None)
                    if stage == stages - 1:
                        h = self.model.norm(h)
                        states.append(h)
            gates = torch.stack([self.exit_gate(h) for h in states], dim=-1)
            return LoopLMOutput(hidden_states=states, gate_logits=gates, exit_probs=exit_distribution(gates))

    naive = NaivePipelineLoop(reference.config)
    naive.load_state_dict(reference.state_dict())
    with torch.no_grad():
        return stage1_loss(naive, ids, labels, beta=BETA, num_steps=steps).loss.item()


def pipeline_training(rank: int, world_size: int, root: str, configs: dict, crash_at: int) -> dict:
    """Trainer runs on 2 ranks around PP=2 (configs: "pp2" = PP=2, "pp1" = PP=1 x DP=2, same batches,
    "pp2_megatron" = PP=2 with megatron-core's DistributedOptimizer): all three straight; PP=2 crashed after
    `crash_at` then resumed at PP=2 and (a copy) at PP=1; PP=1 crashed then resumed at PP=2. Then the model
    alone: PP=2 <-> PP=1 through save_model/load_model, compared exactly."""
    import shutil
    from pathlib import Path

    import torch.distributed as dist

    from looplm.model.megatron import checkpointing
    from looplm.model.megatron.config import ParallelConfig
    from looplm.model.megatron.convert import gather_pipeline_parallel, local_state
    from looplm.model.megatron.distributed import initialize_model_parallel
    from looplm.model.megatron.model import MegatronLoopLM

    def run(name: str, output: str, crash: int | None = None) -> list:
        return train(rank, world_size, [(configs[name], f"{root}/{output}", crash)])[0]

    out = {"pp2": run("pp2", "pp2"), "pp1": run("pp1", "pp1"), "pp2_megatron": run("pp2_megatron", "pp2-megatron")}
    out["pp2_crashed"] = run("pp2", "pp2-resumed", crash_at)
    if rank == 0:
        shutil.copytree(f"{root}/pp2-resumed", f"{root}/pp2-moved")
    dist.barrier()
    out["pp2_resumed"] = run("pp2", "pp2-resumed")
    out["pp2_moved_to_pp1"] = run("pp1", "pp2-moved")
    run("pp1", "pp1-moved", crash_at)
    out["pp1_moved_to_pp2"] = run("pp2", "pp1-moved")

    config = configs["pp2"].model.build()

    def build(pp: int, seed: int):
        parallel = ParallelConfig(pipeline_parallel=pp)
        initialize_model_parallel(parallel, seed=seed)
        return MegatronLoopLM(config, parallel, seed=seed)

    def full(model) -> dict:
        return gather_pipeline_parallel(local_state(model))

    saved_pp2 = build(2, seed=21)
    checkpointing.save_model(saved_pp2, Path(root) / "model-pp2")
    reference = full(saved_pp2)
    pp1 = build(1, seed=22)
    out["pp1_differs_before_load"] = any(not torch.equal(full(pp1)[n], reference[n]) for n in reference)
    checkpointing.load_model(pp1, Path(root) / "model-pp2")
    out["pp2_to_pp1_exact"] = all(torch.equal(full(pp1)[n], reference[n]) for n in reference)
    checkpointing.save_model(pp1, Path(root) / "model-pp1")
    pp2 = build(2, seed=23)
    checkpointing.load_model(pp2, Path(root) / "model-pp1")
    out["pp1_to_pp2_exact"] = all(torch.equal(full(pp2)[n], reference[n]) for n in reference)
    return out


# Loop-robust options (looplm.model.objectives): reinject_embedding, the contraction and KV consistency terms.
LOOP_ROBUST_OPTIONS = {
    "reinject": {"reinject": True},
    "contraction": {"contraction_penalty": 0.7},
    "kv_consistency": {"kv_consistency": 2.0},
    "all": {"reinject": True, "contraction_penalty": 0.7, "kv_consistency": 2.0},
    # loop-level recompute reruns the pass (and the probed pass) in backward
    "contraction_recompute_loop": {"reinject": True, "contraction_penalty": 0.7, "recompute": "loop"},
}


def loop_robust_parity(
    rank: int, world_size: int, cases: list[tuple[int, bool, str]], root: str, steps: int = STEPS
) -> dict:
    """For each (tensor_parallel, sequence_parallel, option) case (DP = the rest of the world), one Stage I
    forward/backward of the reference and of the Megatron model loading the reference's Ouro HF checkpoint: the
    loss, each loop-robust term, per-step CE and every gradient. The reference is built with the option's
    reinject_embedding, so its checkpoint's config.json carries it into the Megatron model's build."""
    import dataclasses

    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    from looplm.model.megatron.checkpointing import import_hf
    from looplm.model.megatron.config import ParallelConfig
    from looplm.model.megatron.convert import gather_tensor_parallel, local_state, megatron_to_hf
    from looplm.model.megatron.distributed import initialize_model_parallel, wrap_data_parallel
    from looplm.model.megatron.model import MegatronLoopLM
    from looplm.model.objectives import stage1_loss

    results = {}
    for tp, sp, option in cases:
        settings = dict(LOOP_ROBUST_OPTIONS[option])
        reinject = settings.pop("reinject", False)
        recompute = settings.pop("recompute", "none")
        settings["probe_seed"] = 1234
        base, reference, ids, labels = reference_and_batch()
        config = dataclasses.replace(base, reinject_embedding=reinject)
        reference.config = config  # same weights, the option's loop
        ref_out = stage1_loss(reference, ids, labels, beta=BETA, num_steps=steps, **settings)
        ref_out.loss.backward()
        ref_grads = {n: p.grad for n, p in reference.named_parameters()}
        checkpoint = reference.save_pretrained(f"{root}/reference-{option}-rank{rank}", overwrite=True)
        parallel = ParallelConfig(tensor_parallel=tp, sequence_parallel=sp, recompute=recompute)
        initialize_model_parallel(parallel, seed=7)
        model = MegatronLoopLM(config, parallel, seed=7)
        import_hf(model, checkpoint)
        ddp = wrap_data_parallel(model)
        if parallel_state.get_data_parallel_world_size() != 1:
            raise ValueError("loop_robust_parity compares whole batches: run it with DP = 1")
        ddp.zero_grad_buffer()
        out = ddp(ids, labels, objective="stage1", num_steps=steps, beta=BETA, **settings)
        out.loss.backward()
        finalize_model_grads([ddp])
        grads = megatron_to_hf(gather_tensor_parallel(local_state(model, grads=True)), config)
        errors = relative_errors(grads, ref_grads)
        terms = {}
        for name in ("contraction", "kv_consistency"):
            mine, theirs = getattr(out, name), getattr(ref_out, name)
            terms[name] = (None if mine is None else mine.item(), None if theirs is None else theirs.item())
        results[(tp, sp, option)] = {
            "loss": out.loss.item(),
            "ref_loss": ref_out.loss.item(),
            "terms": terms,
            "max_grad_rel_err": max(errors.values()),
            "worst": max(errors, key=errors.get),
            "ce_per_step": out.ce_per_step.tolist(),
            "ref_ce_per_step": ref_out.ce_per_step.tolist(),
        }
        dist.barrier()
    return results


def reinject_round_trip(rank: int, world_size: int, root: str) -> dict:
    """A re-injecting Megatron model: export to Ouro HF, load as the reference LoopLM (config and tensors); and
    importing that checkpoint into a model built without re-injection is an error, not a silent change."""
    import dataclasses

    from looplm.model import LoopLM
    from looplm.model.config import ConfigError
    from looplm.model.megatron.checkpointing import export_hf, import_hf
    from looplm.model.megatron.config import ParallelConfig
    from looplm.model.megatron.convert import gather_tensor_parallel, local_state, megatron_to_hf
    from looplm.model.megatron.distributed import initialize_model_parallel
    from looplm.model.megatron.model import MegatronLoopLM
    from looplm.model.objectives import stage1_loss

    base, _, ids, labels = reference_and_batch()
    config = dataclasses.replace(base, reinject_embedding=True)
    parallel = ParallelConfig()
    initialize_model_parallel(parallel, seed=5)
    model = MegatronLoopLM(config, parallel, seed=5)
    with torch.no_grad():
        loss = model(ids, labels, num_steps=STEPS, beta=BETA).loss.item()
    path = export_hf(model, config, f"{root}/reinject-hf")
    loaded = LoopLM.from_pretrained(path)
    state = megatron_to_hf(gather_tensor_parallel(local_state(model)), config)
    with torch.no_grad():
        ref_loss = stage1_loss(loaded, ids, labels, beta=BETA, num_steps=STEPS).loss.item()
    plain = MegatronLoopLM(base, parallel, seed=5)
    try:
        import_hf(plain, path)
        error = "no error"
    except ConfigError as err:
        error = str(err)
    return {
        "config": loaded.config,
        "tensors_equal": all(torch.equal(loaded.state_dict()[n], state[n]) for n in state),
        "loss": loss,
        "ref_loss": ref_loss,
        "mismatch_error": error,
    }


def loop_robust_single_process(rank: int, world_size: int, root: str, options: list[str], config) -> dict:
    """loop_robust_parity at TP=1 for each option, then reinject_round_trip, then a Megatron trainer run of
    `config` (its records and the config.json of its HF export), in one process start-up."""
    import json
    from pathlib import Path

    from looplm.pipelines.training.trainer import train_on_rank

    parity_results = loop_robust_parity(rank, world_size, [(1, False, o) for o in options], root)
    round_trip = reinject_round_trip(rank, world_size, root)
    records = train_on_rank(config, Path(root) / "trained")
    exported = json.loads((Path(root) / "trained" / "hf" / "config.json").read_text())
    return {"parity": parity_results, "round_trip": round_trip, "records": records, "exported": exported}
