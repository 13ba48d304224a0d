"""The LoopLM on megatron-core: the reference model's mathematics with tensor, sequence, pipeline and data
parallelism.

Same semantics as `looplm.model.looplm.LoopLM` (ouro-spec.md §1-2): embeddings once; the whole N-layer sandwich
stack (a megatron TransformerBlock) runs T times with shared weights; after every pass the shared final RMSNorm
gives h_t, which feeds the step's LM head, the exit gate and the next pass. T is a call argument.

Layout: activations are megatron's [seq, batch, hidden]; under sequence parallelism the residual stream holds
this rank's slice of the sequence. The LM head is a vocab-parallel ColumnParallelLinear and the per-step
cross-entropy is megatron's vocab-parallel one, computed one step at a time under activation checkpointing, so
no rank ever holds more than one step's [seq, batch, vocab / TP] logits. The exit gate is a replicated
Linear(d, 1) over the full sequence.

Under pipeline parallelism (DESIGN.md decision 3) a MegatronLoopLM is one stage: it builds only its share of
the N layers (megatron numbers them globally, so checkpoints reshard across PP sizes); the first stage also holds
the embedding, the last the final norm, the LM head and the exit gate (`pre_process` / `post_process`, megatron's
names). `pipeline.py` runs the loop over the stages. The TransformerBlock is always built with pre_process=True,
so it computes on its argument; the stage's input from the previous stage arrives through `set_input_tensor` and
is read by the loop chunk, not by the block.

With `reinject_embedding` (looplm's option, not Ouro's; see looplm.py) every pass after the first starts from
h_{t-1} + rms_normalize(e): `pass_input`, on the embedding output in megatron's layout (under SP both are this
rank's slice of the sequence). Under pipeline parallelism the first stage recomputes e at each loop, so nothing
but h travels. `capture_keys_values` exposes each layer's keys and values of a pass (the KV consistency term of
losses.py) without changing the layers: it reads them off the fused QKV projection's output while it is open.

Objectives live in `losses.py`; `forward` runs one of them, so a DDP-wrapped model is called like any module.
The CPU patches (`cpu_shim.apply`) are applied by whoever starts the process; the constructor only checks them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import TransformerBlock
from torch.utils.checkpoint import checkpoint

from ..config import LoopLMConfig
from ..looplm import rms_normalize
from ..objectives import IGNORE_INDEX
from . import cpu_shim
from .config import ParallelConfig
from .layer_specs import block_spec, norm_module


class MegatronLoopLM(MegatronModule):
    def __init__(self, config: LoopLMConfig, parallel: ParallelConfig, *, seed: int = 0):
        cpu_shim.check()
        tf_config = parallel.transformer_config(config)
        super().__init__(config=tf_config)
        self.loop_config = config
        self.parallel = parallel
        self.model_type = ModelType.encoder_or_decoder  # what megatron's schedules ask of a model
        self.pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        self.post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.share_embeddings_and_output_weights = False  # Ouro is untied: no embedding all-reduce across stages
        self.input_tensor: torch.Tensor | None = None
        d = config.hidden_size
        if self.pre_process:
            self.embedding = LanguageModelEmbedding(
                tf_config,
                vocab_size=config.vocab_size,
                max_sequence_length=config.max_position_embeddings,
                position_embedding_type="rope",
            )
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.attention_head_dim,
            rotary_percent=1.0,
            rotary_base=config.rope_theta,
            use_cpu_initialization=tf_config.use_cpu_initialization,
        )
        self.decoder = TransformerBlock(
            tf_config, block_spec(tf_config, parallel.transformer_impl), post_layer_norm=False, pre_process=True
        )
        if self.post_process:
            self.final_layernorm = build_module(
                norm_module(parallel.transformer_impl), config=tf_config, hidden_size=d, eps=config.rms_norm_eps
            )
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                d,
                config.vocab_size,
                config=tf_config,
                init_method=tf_config.init_method,
                bias=False,
                gather_output=False,
            )
            # Replicated on every TP rank and fed the full sequence, so its gradient needs no TP reduction. Seeded
            # explicitly so that every rank starts from the same gate.
            self.exit_gate = torch.nn.Linear(d, 1, bias=True, dtype=tf_config.params_dtype)
            with torch.no_grad():
                generator = torch.Generator().manual_seed(seed)
                self.exit_gate.weight.copy_(torch.randn(1, d, generator=generator) * config.initializer_range)
                self.exit_gate.bias.zero_()
        if torch.cuda.is_available():
            self.cuda(torch.cuda.current_device())

    def set_input_tensor(self, input_tensor: list[torch.Tensor | None] | torch.Tensor | None) -> None:
        """What megatron's schedules call before a forward step: the previous stage's output (None on stage 0)."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    # ---------------------------------------------------------------- the loop, piece by piece

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq] token ids -> h_0 [seq(/TP under SP), batch, hidden]."""
        if input_ids.shape[1] > self.loop_config.max_position_embeddings:
            raise ValueError(
                f"sequence of {input_ids.shape[1]} tokens is longer than the context "
                f"({self.loop_config.max_position_embeddings} positions)"
            )
        return self.embedding(input_ids, position_ids=None)

    def attention_inputs(self, seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The causal mask (True = masked out) and RoPE frequencies; the same for every pass."""
        mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)[None, None]
        return {"attention_mask": mask, "rotary_pos_emb": self.rotary_pos_emb(seq_len)}

    def pass_input(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """The input of a pass after the first: h_{t-1}, or h_{t-1} + rms_normalize(e) with reinject_embedding."""
        if not self.loop_config.reinject_embedding:
            return h
        return h + rms_normalize(embedding, self.loop_config.rms_norm_eps)

    @contextlib.contextmanager
    def capture_keys_values(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """While open, every layer pass appends its (keys, values), each [seq, batch, local KV heads, head_dim]
        before RoPE (this TP rank's heads, the full sequence), read off the fused QKV projection's output.

        Only with recompute="none": a recomputed pass runs its first forward without autograd (and again in
        backward), so what it captured would carry no gradient.
        """
        if self.parallel.recompute != "none":
            raise ValueError(f"capturing keys and values needs recompute='none', not {self.parallel.recompute!r}")
        captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        heads_per_group = self.loop_config.num_attention_heads // self.loop_config.num_key_value_heads
        head_dim = self.loop_config.attention_head_dim

        def keep(_module, _args, output) -> None:
            mixed = output[0] if isinstance(output, tuple) else output
            # megatron's fused layout, per query group: its query heads, then its key, then its value
            grouped = mixed.view(*mixed.shape[:2], -1, (heads_per_group + 2) * head_dim)
            _, k, v = grouped.split([heads_per_group * head_dim, head_dim, head_dim], dim=-1)
            captured.append((k, v))

        handles = [layer.self_attention.linear_qkv.register_forward_hook(keep) for layer in self.decoder.layers]
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def recurrent_step(self, h: torch.Tensor, attention_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One pass through the whole shared stack, then the final norm: h_{t-1} -> h_t. Under pipeline
        parallelism: this stage's layers, and the final norm on the last stage.

        With recompute="loop" only h_{t-1} is kept for backward, which reruns the pass (megatron's checkpoint,
        which also restores the model-parallel RNG states).
        """
        if self.parallel.recompute == "loop" and torch.is_grad_enabled() and h.requires_grad:
            mask, rope = attention_inputs["attention_mask"], attention_inputs["rotary_pos_emb"]
            return tensor_parallel.checkpoint(self._pass, False, h, mask, rope)
        return self._pass(h, attention_inputs["attention_mask"], attention_inputs["rotary_pos_emb"])

    def _pass(self, h: torch.Tensor, attention_mask: torch.Tensor, rotary_pos_emb: torch.Tensor) -> torch.Tensor:
        h = self.decoder(h, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)
        return self.final_layernorm(h) if self.post_process else h

    def full_sequence(self, h: torch.Tensor) -> torch.Tensor:
        """h over the whole sequence. Under SP the backward keeps this rank's slice of the gradient (no sum):
        every TP rank computes the same loss from the gathered tensor."""
        if not self.config.sequence_parallel:
            return h
        return gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)

    def exit_gate_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The gate's logit for every position of h_t: [seq, batch] over the full sequence."""
        return self.exit_gate(self.full_sequence(h)).squeeze(-1)

    def step_token_losses(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token CE [seq, batch] of one step's h_t through the vocab-parallel head and cross-entropy.

        labels is [seq, batch] with IGNORE_INDEX where not counted (those positions get 0). The step's logits
        are rebuilt in backward rather than stored.
        """
        ignored = labels == IGNORE_INDEX
        target = labels.masked_fill(ignored, 0)
        if torch.is_grad_enabled() and h.requires_grad:
            return checkpoint(self._head_cross_entropy, h, target, ignored, use_reentrant=False)
        return self._head_cross_entropy(h, target, ignored)

    def _head_cross_entropy(self, h: torch.Tensor, target: torch.Tensor, ignored: torch.Tensor) -> torch.Tensor:
        logits, _ = self.output_layer(h)  # [seq, batch, vocab / TP]; under SP the layer gathers the sequence
        ce = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), target)
        return ce.masked_fill(ignored, 0.0)

    # ---------------------------------------------------------------- an objective, end to end

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        *,
        objective: str = "stage1",
        num_steps: int | None = None,
        beta: float = 0.05,
        **objective_kwargs: Any,
    ):
        """Run `objective` ("stage1" or "stage2", see losses.py) over a [batch, seq] batch; returns its LossOutput.
        objective_kwargs go to the objective (stage1: contraction_penalty, kv_consistency, probe_seed)."""
        from . import losses

        if not (self.pre_process and self.post_process):
            raise RuntimeError("this model is one pipeline stage: run the loop with pipeline.loop_chunks")
        steps = self.loop_config.total_ut_steps if num_steps is None else num_steps
        if objective == "stage1":
            return losses.stage1_loss(self, input_ids, labels, beta=beta, num_steps=steps, **objective_kwargs)
        if objective == "stage2":
            return losses.stage2_loss(self, input_ids, labels, num_steps=steps, **objective_kwargs)
        raise ValueError(f"objective must be 'stage1' or 'stage2', got {objective!r}")

    def lm_parameters(self) -> list[torch.nn.Parameter]:
        """Everything but the exit gate: what Stage II freezes."""
        gate = {id(p) for p in self.exit_gate.parameters()} if self.post_process else set()
        return [p for p in self.parameters() if id(p) not in gate]
