"""Bodies of the multi-process tests; each runs on every gloo rank (see _mcore_spawn.run_ranks) and returns figures.

The reference is always the single-process `looplm.model.LoopLM` with `objectives.stage1_loss/stage2_loss`,
built from the same seed on every rank, so each rank can compare against it without any file passing.
"""

from __future__ import annotations

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


def train(rank: int, world_size: int, runs: list[tuple]) -> list[list]:
    """Training runs one after another on this gloo group (no Ray): each (config, output, stop_after) through
    pipelines.training.trainer.train_on_rank; one process start-up for all of them."""
    from looplm.pipelines.training.trainer import train_on_rank

    return [train_on_rank(config, output, stop_after=stop_after) for config, output, stop_after in runs]


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
