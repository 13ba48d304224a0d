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
# FP8 (model/megatron/fp8.py): megatron's format and recipe names. TE runs every recipe; the local FP8 linear
# (real e4m3/e5m2 GEMMs through torch._scaled_mm, CPU included) has tensor scales only, so no MXFP8.
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("tensorwise", "delayed", "mxfp8")
LOCAL_FP8_RECIPES = ("tensorwise", "delayed")
FP8_AMAX_ALGOS = ("most_recent", "max")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel: int = 1
    sequence_parallel: bool = False  # shard norms/residual activations along the sequence (needs TP > 1)
    pipeline_parallel: int = 1  # stages of the N layers; each micro-batch travels the pipeline T times (pipeline.py)
    transformer_impl: str = "local"  # "local": torch modules, CPU and GPU; "transformer_engine": TE modules
    precision: str = "auto"  # "auto": bf16 with CUDA, fp32 without; "bf16" also runs on CPU (slowly; tests)
    # FP8 GEMMs in the looped blocks (never the LM head or the exit gate): None, "hybrid" (e4m3 forward, e5m2
    # gradients) or "e4m3". transformer_engine: TE's FP8; local: fp8.py's FP8 linear. Where it cannot run it is an
    # error, never silently dropped.
    fp8: str | None = None
    fp8_recipe: str = "tensorwise"  # current scaling (the measured default, fp8.py); "delayed"; "mxfp8" (TE only)
    fp8_amax_history_len: int = 16  # delayed scaling: calls (T per step) the scale looks back over
    fp8_amax_compute_algo: str = "max"  # delayed scaling: "max" of the history or its "most_recent" entry
    fp8_margin: int = 0
    fp8_first_last_layers_bf16: bool = False  # keep the first/last physical layers (in every loop) out of FP8
    fp8_layers_at_start_in_bf16: int = 1
    fp8_layers_at_end_in_bf16: int = 1
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
            self._check_fp8()

    def _check_fp8(self) -> None:
        """What no machine can run; what this machine cannot run is checked by fp8.check_runtime."""
        if self.fp8 not in FP8_FORMATS:
            raise ConfigError(f"fp8 must be None or one of {FP8_FORMATS}, got {self.fp8!r}")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ConfigError(f"fp8_recipe must be one of {FP8_RECIPES}, got {self.fp8_recipe!r}")
        if self.fp8_amax_compute_algo not in FP8_AMAX_ALGOS:
            raise ConfigError(
                f"fp8_amax_compute_algo must be one of {FP8_AMAX_ALGOS}, got {self.fp8_amax_compute_algo!r}"
            )
        if self.fp8_amax_history_len < 1 or self.fp8_margin < 0:
            raise ConfigError("fp8_amax_history_len must be >= 1 and fp8_margin >= 0")
        if min(self.fp8_layers_at_start_in_bf16, self.fp8_layers_at_end_in_bf16) < 0:
            raise ConfigError("fp8_layers_at_start_in_bf16 and fp8_layers_at_end_in_bf16 must be >= 0")
        if self.transformer_impl == "local":
            if self.fp8_recipe not in LOCAL_FP8_RECIPES:
                raise ConfigError(
                    f"fp8_recipe={self.fp8_recipe!r} is not available with transformer_impl='local': its FP8 linear "
                    f"has {LOCAL_FP8_RECIPES} (torch._scaled_mm takes no MX block scales); MXFP8 needs "
                    "transformer_impl='transformer_engine' on a Blackwell GPU"
                )
            if self.fp8_recipe == "delayed" and self.recompute != "none":
                raise ConfigError(
                    f"fp8_recipe='delayed' with recompute={self.recompute!r} is not available with "
                    "transformer_impl='local': a recomputed forward would advance the amax history and quantise with "
                    "another scale than the first forward; use fp8_recipe='tensorwise' or recompute='none'"
                )
        if self.fp8_recipe == "delayed" and self.fp8_first_last_layers_bf16:
            raise ConfigError(
                "fp8_first_last_layers_bf16 is not available with fp8_recipe='delayed': megatron's TransformerConfig "
                "rejects it (TE opens one autocast around all layers for delayed scaling); use 'tensorwise'"
            )

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
        if self.fp8 is not None and self.fp8_first_last_layers_bf16:
            kept = self.fp8_layers_at_start_in_bf16 + self.fp8_layers_at_end_in_bf16
            if kept >= model.num_hidden_layers:
                raise ConfigError(
                    f"fp8_first_last_layers_bf16 keeps {kept} of {model.num_hidden_layers} layers in high precision, "
                    "so no layer would run in FP8; lower fp8_layers_at_start/end_in_bf16 or set fp8=null"
                )

    def transformer_config(self, model: LoopLMConfig) -> TransformerConfig:
        """The megatron TransformerConfig of `model` under this layout."""
        from megatron.core.transformer.transformer_config import TransformerConfig
        from megatron.core.utils import init_method_normal

        from .fp8 import check_runtime

        self.check_model(model)
        check_runtime(self)
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
            **self._fp8_fields(),
            **(
                {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
                if self.recompute == "layer"
                else {}
            ),
        )

    def _fp8_fields(self) -> dict:
        """TransformerConfig's FP8 fields: TE reads them in megatron's fp8 context, the local spec in block_spec."""
        if self.fp8 is None:
            return {}
        fields = dict(
            fp8=self.fp8,
            fp8_recipe=self.fp8_recipe,
            fp8_amax_history_len=self.fp8_amax_history_len,
            fp8_amax_compute_algo=self.fp8_amax_compute_algo,
            fp8_margin=self.fp8_margin,
        )
        if self.fp8_first_last_layers_bf16:
            fields.update(
                first_last_layers_bf16=True,
                num_layers_at_start_in_bf16=self.fp8_layers_at_start_in_bf16,
                num_layers_at_end_in_bf16=self.fp8_layers_at_end_in_bf16,
            )
        return fields
