"""The Ouro "sandwich" decoder layer as megatron-core submodules, for the `local` and `transformer_engine` impls.

No stock Megatron spec has four norms per layer. Ouro's layer is norm -> op -> norm -> residual add, twice:

    h = h + post_self_attn_layernorm(self_attention(input_layernorm(h)))
    h = h + post_mlp_layernorm(mlp(pre_mlp_layernorm(h)))

`SandwichTransformerLayer` is a megatron `TransformerLayer` (so TransformerBlock builds, numbers, recomputes and
checkpoints it like any layer) with the two output norms added as submodules and a forward that applies them.
Attention is megatron's SelfAttention (fused-QKV ColumnParallelLinear grouped per query group, RowParallelLinear
out-projection, rotate-half RoPE, GQA); the MLP is megatron's gated MLP (SwiGLU, fc1 = [gate; up]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.utils import make_viewless_tensor

from ..config import ConfigError


class RMSNorm(torch.nn.Module):
    """The reference RMSNorm on megatron's norm interface: normalise in fp32, cast back, then multiply the gain.

    Under sequence parallelism it sees only this rank's slice of the sequence, so its gain is tagged
    `sequence_parallel` and Megatron's finalize_model_grads all-reduces the gain's gradient over the TP group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


@dataclass
class SandwichLayerSubmodules(TransformerLayerSubmodules):
    post_self_attn_layernorm: ModuleSpec | type = IdentityOp
    post_mlp_layernorm: ModuleSpec | type = IdentityOp


class SandwichTransformerLayer(TransformerLayer):
    """A TransformerLayer with Ouro's four norms. Ouro has no biases and no dropout, so no bias-dropout-add."""

    def __init__(self, config: TransformerConfig, submodules: SandwichLayerSubmodules, **kwargs: Any):
        if config.hidden_dropout or config.attention_dropout or config.add_bias_linear:
            raise ConfigError("the sandwich layer has no dropout and no linear biases (Ouro has neither)")
        super().__init__(config=config, submodules=submodules, **kwargs)
        norm_args = dict(config=self.config, hidden_size=self.config.hidden_size, eps=self.config.layernorm_epsilon)
        self.post_self_attn_layernorm = build_module(submodules.post_self_attn_layernorm, **norm_args)
        self.post_mlp_layernorm = build_module(submodules.post_mlp_layernorm, **norm_args)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rotary_pos_emb: torch.Tensor | None = None,
        inference_context: Any = None,
        packed_seq_params: Any = None,
        sequence_len_offset: torch.Tensor | None = None,
        **unused: Any,
    ) -> tuple[torch.Tensor, None]:
        attention, _ = self.self_attention(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb,
            inference_context=inference_context,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
        )
        hidden_states = hidden_states + self.post_self_attn_layernorm(attention)
        mlp, _ = self.mlp(self.pre_mlp_layernorm(hidden_states))
        hidden_states = hidden_states + self.post_mlp_layernorm(mlp)
        # TransformerBlock and the pipeline schedules require a tensor that is not a view.
        return make_viewless_tensor(hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True), None


def _backend(transformer_impl: str) -> tuple[type, type, type, type]:
    """(norm, column-parallel linear, row-parallel linear, core attention) of an implementation."""
    if transformer_impl == "local":
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        return RMSNorm, ColumnParallelLinear, RowParallelLinear, DotProductAttention
    if transformer_impl == "transformer_engine":
        if not torch.cuda.is_available():  # a machine without CUDA never imports Transformer Engine
            raise ConfigError("transformer_impl='transformer_engine' needs a CUDA GPU; use transformer_impl='local'")
        try:
            import transformer_engine  # noqa: F401
            from megatron.core.extensions.transformer_engine import (
                TEColumnParallelLinear,
                TEDotProductAttention,
                TENorm,
                TERowParallelLinear,
            )
        except (ImportError, RuntimeError) as err:  # a partial TE install raises RuntimeError, not ImportError
            raise ConfigError(
                f"transformer_impl='transformer_engine' needs Transformer Engine, which is not usable here ({err}); "
                "use transformer_impl='local' on this machine"
            ) from None
        # Separate TENorm + TE linears keep the parameter names of the local spec, so checkpoints and the
        # converters are shared. (Fusing the pre-norm into TELayerNormColumnParallelLinear is a later option.)
        return TENorm, TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention
    raise ConfigError(f"transformer_impl must be 'local' or 'transformer_engine', got {transformer_impl!r}")


def norm_module(transformer_impl: str) -> type:
    return _backend(transformer_impl)[0]


def sandwich_layer_spec(transformer_impl: str, fp8_recipe: Any = None) -> ModuleSpec:
    """The layer; with `fp8_recipe` (an fp8.FP8Recipe, local impl) its four linears are fp8.py's FP8 linears."""
    norm, column_linear, row_linear, core_attention = _backend(transformer_impl)
    if fp8_recipe is not None:
        if transformer_impl != "local":
            raise ConfigError("the FP8 linear is the local spec's; transformer_engine takes FP8 from the config")
        from .fp8 import FP8ColumnParallelLinear, FP8RowParallelLinear

        column_linear = ModuleSpec(module=FP8ColumnParallelLinear, params={"fp8_recipe": fp8_recipe})
        row_linear = ModuleSpec(module=FP8RowParallelLinear, params={"fp8_recipe": fp8_recipe})
    return ModuleSpec(
        module=SandwichTransformerLayer,
        submodules=SandwichLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column_linear,
                    core_attention=core_attention,
                    linear_proj=row_linear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            post_self_attn_layernorm=norm,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column_linear, linear_fc2=row_linear)),
            post_mlp_layernorm=norm,
        ),
    )


def block_spec(config: TransformerConfig, transformer_impl: str) -> TransformerBlockSubmodules:
    """This pipeline stage's share of the N-layer stack (all of it without PP); its final norm is the LoopLM's,
    applied after every pass, so the block has none."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    layer = sandwich_layer_spec(transformer_impl)
    count = get_num_layers_to_build(config)
    layers = [layer] * count
    if config.fp8 and transformer_impl == "local":
        # TE applies FP8 from the config in megatron's fp8 context; the local spec swaps in the FP8 linears,
        # except in the physical layers kept in high precision (global indices: this stage's start at `offset`).
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        from .fp8 import FP8Recipe, high_precision_layers

        fp8_layer = sandwich_layer_spec(transformer_impl, FP8Recipe.from_transformer_config(config))
        kept, offset = high_precision_layers(config), get_transformer_layer_offset(config)
        layers = [layer if offset + i in kept else fp8_layer for i in range(count)]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=None)
