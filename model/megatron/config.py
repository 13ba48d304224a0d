"""How the Megatron LoopLM is laid out on devices, and the TransformerConfig it implies.

The model's mathematics lives in `LoopLMConfig` (shared with the reference model); this dataclass adds only
what Megatron needs to place it: tensor/sequence/pipeline parallel sizes, the layer implementation and the
precision. Every combination that cannot run is rejected here with the field's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..config import ConfigError, LoopLMConfig

if TYPE_CHECKING:
    from megatron.core.transformer.transformer_config import TransformerConfig

TRANSFORMER_IMPLS = ("local", "transformer_engine")
PRECISIONS = ("auto", "fp32", "bf16")
RECOMPUTE = ("none", "layer", "loop")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel: int = 1
    sequence_parallel: bool = False  # shard norms/residual activations along the sequence (needs TP > 1)
    pipeline_parallel: int = 1  # stages of the N layers; each micro-batch travels the pipeline T times (pipeline.py)
    transformer_impl: str = "local"  # "local": torch modules, CPU and GPU; "transformer_engine": TE modules
    precision: str = "auto"  # "auto": bf16 with CUDA, fp32 without; "bf16" also runs on CPU (slowly; tests)
    fp8: str | None = None  # the next issue (TE on Hopper); asked for now it is an error, never silently dropped
    # Activation recompute, the memory of a looped model growing with N x T layer passes (ouro-spec.md §6.5).
    # "none": keep every activation; "layer": keep each layer pass's input and recompute the layer in backward
    # (megatron's full/uniform recompute, one layer per unit); "loop": keep only each pass's input h_{t-1} and
    # recompute the whole stack in backward (loop-level checkpointing: T hidden states kept instead of N x T).
    recompute: str = "none"

    def __post_init__(self) -> None:
        if self.tensor_parallel < 1 or self.pipeline_parallel < 1:
            raise ConfigError("tensor_parallel and pipeline_parallel must be at least 1")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ConfigError(f"transformer_impl must be one of {TRANSFORMER_IMPLS}, got {self.transformer_impl!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ConfigError("sequence_parallel needs tensor_parallel > 1")
        if self.fp8 is not None:
            raise ConfigError(f"fp8={self.fp8!r}: FP8 is not implemented yet; it needs transformer_engine on a GPU")

    @property
    def params_dtype(self) -> torch.dtype:
        if self.precision == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def check_model(self, model: LoopLMConfig) -> None:
        """Reject a model this layout cannot split; each message names the fields involved."""
        tp = self.tensor_parallel
        if model.num_attention_heads % tp:
            raise ConfigError(
                f"tensor_parallel ({tp}) does not divide num_attention_heads ({model.num_attention_heads})"
            )
        if model.num_key_value_heads % tp:
            raise ConfigError(
                f"tensor_parallel ({tp}) does not divide num_key_value_heads ({model.num_key_value_heads})"
            )
        if model.intermediate_size % tp:
            raise ConfigError(f"tensor_parallel ({tp}) does not divide intermediate_size ({model.intermediate_size})")
        if model.vocab_size % tp:
            raise ConfigError(f"tensor_parallel ({tp}) does not divide vocab_size ({model.vocab_size})")
        if model.num_hidden_layers % self.pipeline_parallel:
            raise ConfigError(
                f"pipeline_parallel ({self.pipeline_parallel}) does not divide num_hidden_layers "
                f"({model.num_hidden_layers})"
            )
        if model.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings=True is not supported by the Megatron LoopLM (Ouro is untied)")

    def transformer_config(self, model: LoopLMConfig) -> TransformerConfig:
        """The megatron TransformerConfig of `model` under this layout."""
        from megatron.core.transformer.transformer_config import TransformerConfig
        from megatron.core.utils import init_method_normal

        self.check_model(model)
        dtype = self.params_dtype
        on_gpu = torch.cuda.is_available()
        return TransformerConfig(
            num_layers=model.num_hidden_layers,
            hidden_size=model.hidden_size,
            ffn_hidden_size=model.intermediate_size,
            num_attention_heads=model.num_attention_heads,
            num_query_groups=model.num_key_value_heads,
            kv_channels=model.attention_head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=model.rms_norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=model.initializer_range,
            # The reference draws every matrix from N(0, initializer_range), output projections included.
            output_layer_init_method=init_method_normal(model.initializer_range),
            tensor_model_parallel_size=self.tensor_parallel,
            sequence_parallel=self.sequence_parallel,
            pipeline_model_parallel_size=self.pipeline_parallel,
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            fp16=False,
            use_cpu_initialization=not on_gpu,
            # Fusions that need CUDA extensions stay off; the CPU paths of the others are exact.
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
            apply_rope_fusion=False,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            transformer_impl=self.transformer_impl,
            **(
                {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
                if self.recompute == "layer"
                else {}
            ),
        )
