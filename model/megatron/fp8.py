"""FP8 for the looped blocks: a real-FP8 linear for megatron's `local` spec, its scaling recipes, and the checks
that decide where FP8 can run.

Two implementations, one set of recipes (DESIGN.md decision 4):
- `transformer_impl="transformer_engine"` (GPU): TE linears; megatron's TransformerBlock opens TE's
  fp8_autocast from the TransformerConfig's fp8 fields. Nothing here runs on that path except the checks.
- `transformer_impl="local"` (CPU, and GPUs without TE): `FP8ColumnParallelLinear` / `FP8RowParallelLinear`,
  drop-ins for megatron's column/row-parallel linears that receive the same sharded weight and run their three
  GEMMs through `torch._scaled_mm` on float8 operands, the layout nanochat's fp8.py uses:
      forward      y  = x @ W^T      x: e4m3, W: e4m3
      backward     dx = g @ W        g: e5m2 ("hybrid") or e4m3 ("e4m3"), W: e4m3
                   dW = g^T @ x      g: as above, x: e4m3
  with fp32 accumulation and per-tensor (tensorwise) scales, output in the activation dtype. Checked on torch
  2.13 CPU: `_scaled_mm` accepts e4m3/e5m2 operands with scalar fp32 scales and returns exactly the fp32 product
  of the dequantised operands; it rejects block scales (MX: e8m0 per 32 elements, "Invalid scaling
  configuration"), so MXFP8 is a TE-only recipe and asking the local linear for it is a config error. On CPU the
  FP8 GEMM is numerically FP8 but not faster (it widens to fp32; bench/fp8_bench.py measures it). The quantised
  operands, not the high-precision ones, are what backward keeps, as TE does.

Recipes (megatron's `fp8_recipe` names):
- "tensorwise" (current scaling, TE's Float8CurrentScaling): every call scales each operand by
  fp8_max / amax(operand) of that very tensor. Nothing carries over from call to call.
- "delayed" (TE's DelayedScaling): each operand's scale comes from an amax history of earlier calls
  (`amax_history_len`, `amax_compute_algo` "max" or "most_recent", `margin`); the call then records its own
  amax. The history advances once per call. That is also what TE does in this model: megatron's TransformerBlock
  opens one fp8_autocast per forward of the block and updates the delayed-scaling state when it closes, and the
  LoopLM calls the block T times per step, so one module's history receives T loops per step and the scale of
  loop t is derived from loops t-1, t-2, ... Activations whose range differs from loop to loop therefore get a
  scale made for another loop (saturating when the range grows, losing mantissa when it shrinks).
- "mxfp8": TE on Blackwell only (see above).

The default is "tensorwise", DESIGN.md's choice, now confirmed by measurement (bench/fp8_bench.py, BENCHMARKS.md
"FP8 on looped blocks": tiny LoopLM, T=4, 48 AdamW steps against fp32 from the same init and batches). The
looped-model effect is in the gradients: a linear's output-gradient amax differs by about 20x (median; up to 46x)
between its T calls in one step, while its input amax differs by only 1.2x (the sandwich norms). So one history
fed by all T loops either saturates the loops whose range outgrows their predecessor's ("most_recent", history
1, megatron's default: 0.6% of inputs and 0.3% of gradients saturated, loss gap +1.8%, the only recipe clearly
worse than fp32) or, with "max" over a history of >= T calls, scales every loop for the largest one and flushes
small-loop gradients to zero (0.46% flushed with e5m2, 10.6% with e4m3 gradients, against 0.006% and 2.9% for
current scaling). Current scaling saturates nothing and flushes least; its loss gap (-0.4%) and those of delayed
"max" (-0.7%, -1.4%) are within this short run's trajectory noise (several FP8 runs end below fp32). Delayed's
defaults here are therefore history 16 with "max" (not megatron's 1 / "most_recent").

Current scaling needs no state, so it is also exact under activation recompute; delayed scaling is not (a
recomputed forward would advance the history and use another scale), so the local linear rejects delayed +
recompute at config time. The history is not checkpointed: a resumed run starts a fresh history (TE keeps it in
`_extra_state`).

Tensor parallelism: each rank scales its own shard of the weight and of the gradient (no amax all-reduce). That
is exact per rank, since each rank dequantises its own partial product before megatron's gather/reduce, but a
TP run is not bitwise equal to a TP=1 FP8 run. The LM head and the exit gate are never FP8 (model.py builds them
from plain modules), and `fp8_first_last_layers_bf16` keeps the first/last physical layers, i.e. those layers in
every loop, in the parameters' precision.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from ..config import ConfigError
from .config import FP8_AMAX_ALGOS, FP8_FORMATS, FP8_RECIPES, LOCAL_FP8_RECIPES

if TYPE_CHECKING:
    from megatron.core.transformer.transformer_config import TransformerConfig

    from .config import ParallelConfig

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
# Compute capability that FP8 GEMMs need: Ada/Hopper for tensor scales, Blackwell for MX block scales.
FP8_MIN_CAPABILITY = (8, 9)
MXFP8_MIN_CAPABILITY = (10, 0)
TE_MIN_VERSION_FOR = {"tensorwise": (2, 2), "delayed": (1, 0), "mxfp8": (2, 1)}  # megatron 0.16.1's fp8_utils

INPUT, WEIGHT, GRAD = 0, 1, 2  # the three quantised operands of a linear, one scaling slot each


@dataclass(frozen=True)
class FP8Recipe:
    format: str = "hybrid"  # "hybrid": e4m3 forward operands, e5m2 gradients; "e4m3": e4m3 everywhere
    recipe: str = "tensorwise"
    amax_history_len: int = 16  # delayed only
    amax_compute_algo: str = "max"  # delayed only: "max" over the history or its "most_recent" entry
    margin: int = 0  # scales are divided by 2**margin (headroom)

    def __post_init__(self) -> None:
        if self.format not in FP8_FORMATS:
            raise ConfigError(f"fp8 format must be one of {FP8_FORMATS}, got {self.format!r}")
        if self.recipe not in LOCAL_FP8_RECIPES:
            raise ConfigError(
                f"fp8_recipe={self.recipe!r} is not available in the local FP8 linear (it has {LOCAL_FP8_RECIPES})"
            )
        if self.amax_compute_algo not in FP8_AMAX_ALGOS:
            raise ConfigError(f"fp8_amax_compute_algo must be one of {FP8_AMAX_ALGOS}, got {self.amax_compute_algo!r}")
        if self.amax_history_len < 1 or self.margin < 0:
            raise ConfigError("fp8_amax_history_len must be >= 1 and fp8_margin >= 0")

    @property
    def grad_dtype(self) -> torch.dtype:
        return E5M2 if self.format == "hybrid" else E4M3

    @classmethod
    def from_transformer_config(cls, config: TransformerConfig) -> FP8Recipe:
        return cls(
            format=config.fp8,
            recipe=str(getattr(config.fp8_recipe, "value", config.fp8_recipe)),
            amax_history_len=config.fp8_amax_history_len,
            amax_compute_algo=config.fp8_amax_compute_algo,
            margin=config.fp8_margin,
        )


# ---------------------------------------------------------------------------------------------- quantisation


def fp8_max(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def scale_from_amax(amax: torch.Tensor, dtype: torch.dtype, margin: int, fallback: torch.Tensor) -> torch.Tensor:
    """fp8_max / amax / 2**margin, keeping `fallback` where amax is 0 or not finite (TE's rule)."""
    scale = fp8_max(dtype) / amax.float() / (2.0**margin)
    return torch.where((amax > 0) & torch.isfinite(amax), scale, fallback)


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x * scale in fp8, saturating at +-fp8_max (a plain cast would turn e4m3 overflow into NaN)."""
    limit = fp8_max(dtype)
    return (x.float() * scale).clamp(-limit, limit).to(dtype)


def scaled_mm(a: torch.Tensor, b: torch.Tensor, a_inv: torch.Tensor, b_inv: torch.Tensor, out_dtype) -> torch.Tensor:
    """(a * a_inv) @ (b * b_inv) with fp8 a [M, K] and b [K, N]; the layouts the CUDA kernel requires (a
    row-major, b column-major) are made here, so the same code runs on CPU and GPU."""
    return torch._scaled_mm(a.contiguous(), b.t().contiguous().t(), scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype)


class FP8Scaling(torch.nn.Module):
    """The scales of one linear's three operands under a recipe.

    Delayed scaling keeps, per operand, an amax history (newest first) and the scale derived from it; both are
    non-persistent buffers, so checkpoints and the HF conversion never see them.
    """

    def __init__(self, recipe: FP8Recipe):
        super().__init__()
        self.recipe = recipe
        if recipe.recipe == "delayed":
            self.register_buffer("amax_history", torch.zeros(3, recipe.amax_history_len), persistent=False)
            self.register_buffer("scale", torch.ones(3), persistent=False)

    def quantize(self, x: torch.Tensor, slot: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(x in fp8, the inverse scale that dequantises it) for operand `slot` of this call."""
        amax = x.detach().abs().max().float()
        if self.recipe.recipe == "tensorwise":
            scale = scale_from_amax(amax, dtype, self.recipe.margin, torch.ones_like(amax))
        else:
            scale = self.scale[slot].clone()
            self._record(amax, slot, dtype)
        return quantize(x, scale, dtype), scale.reciprocal()

    @torch.no_grad()
    def _record(self, amax: torch.Tensor, slot: int, dtype: torch.dtype) -> None:
        history = self.amax_history[slot]
        history.copy_(torch.roll(history, 1))
        history[0] = amax
        reference = history.max() if self.recipe.amax_compute_algo == "max" else history[0]
        self.scale[slot] = scale_from_amax(reference, dtype, self.recipe.margin, self.scale[slot])


class _FP8Matmul(torch.autograd.Function):
    """x [M, K] @ weight[N, K]^T with all three GEMMs in FP8; keeps the fp8 operands for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scaling: FP8Scaling) -> torch.Tensor:
        x8, x_inv = scaling.quantize(x, INPUT, E4M3)
        w8, w_inv = scaling.quantize(weight, WEIGHT, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.scaling, ctx.x_dtype, ctx.w_dtype = scaling, x.dtype, weight.dtype
        return scaled_mm(x8, w8.t(), x_inv, w_inv, x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = ctx.scaling.quantize(grad_out.contiguous(), GRAD, ctx.scaling.recipe.grad_dtype)
        grad_x = scaled_mm(g8, w8, g_inv, w_inv, ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_w = scaled_mm(g8.t(), x8, g_inv, x_inv, ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scaling: FP8Scaling) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T in FP8 -> [..., N] in x's dtype."""
    out = _FP8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, scaling)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _tp_fp8_forward(
    module: torch.nn.Module,
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    gradient_accumulation_fusion: bool = False,
    allreduce_dgrad: bool = False,
    sequence_parallel: bool = False,
    tp_group: Any = None,
    **unused: Any,
) -> torch.Tensor:
    """megatron's linear_with_grad_accumulation_and_async_allreduce, with the GEMMs in FP8: the same
    communication (SP all-gather of the input / reduce-scatter of its gradient, or the all-reduce of the input
    gradient over TP), expressed with megatron's autograd mappings around the FP8 matmul."""
    if gradient_accumulation_fusion:
        raise ConfigError("gradient_accumulation_fusion (a CUDA extension) is not supported by the FP8 linear")
    if sequence_parallel:
        input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=tp_group)
    elif allreduce_dgrad:
        input = copy_to_tensor_model_parallel_region(input, group=tp_group)
    out = fp8_linear(input, weight, module.fp8_scaling)
    return out + bias if bias is not None else out


class FP8ColumnParallelLinear(ColumnParallelLinear):
    """megatron's ColumnParallelLinear (same parameters, sharding and checkpoint) with FP8 GEMMs."""

    def __init__(self, *args: Any, fp8_recipe: FP8Recipe, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fp8_scaling = FP8Scaling(fp8_recipe)

    def _forward_impl(self, input, weight, *args, **kwargs):
        return _tp_fp8_forward(self, input, weight, *args, **kwargs)


class FP8RowParallelLinear(RowParallelLinear):
    """megatron's RowParallelLinear (same parameters, sharding and checkpoint) with FP8 GEMMs."""

    def __init__(self, *args: Any, fp8_recipe: FP8Recipe, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fp8_scaling = FP8Scaling(fp8_recipe)

    def _forward_impl(self, input, weight, *args, **kwargs):
        return _tp_fp8_forward(self, input, weight, *args, **kwargs)


def high_precision_layers(config: TransformerConfig) -> set[int]:
    """0-based physical layers kept out of FP8 (megatron's first_last_layers_bf16); with a loop they stay in
    high precision in every one of the T passes."""
    if not config.first_last_layers_bf16:
        return set()
    n = config.num_layers
    return set(range(config.num_layers_at_start_in_bf16)) | set(range(n - config.num_layers_at_end_in_bf16, n))


# ---------------------------------------------------------------------------------------------- where FP8 can run


def _capability_name() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"


def _te_version() -> tuple[int, int] | None:
    """TE's installed version from package metadata: no import (a partial TE install breaks on import)."""
    for dist in ("transformer_engine", "transformer-engine"):
        try:
            parts = importlib.metadata.version(dist).split(".")
            return int(parts[0]), int(parts[1])
        except (importlib.metadata.PackageNotFoundError, ValueError, IndexError):
            continue
    return None


def check_runtime(parallel: ParallelConfig) -> None:
    """Reject, on the machine that builds the model, FP8 or TE settings this machine cannot run; each message
    says why. Never imports transformer_engine (and never on a machine without CUDA)."""
    te = parallel.transformer_impl == "transformer_engine"
    cuda = torch.cuda.is_available()
    if te and not cuda:
        raise ConfigError(
            "transformer_impl='transformer_engine' needs a CUDA GPU and this machine has none; Transformer Engine "
            "is never imported here. Use transformer_impl='local' (with fp8 it runs the local FP8 linear)"
        )
    if parallel.fp8 is None:
        return
    if cuda:
        need = MXFP8_MIN_CAPABILITY if parallel.fp8_recipe == "mxfp8" else FP8_MIN_CAPABILITY
        if torch.cuda.get_device_capability() < need:
            raise ConfigError(
                f"fp8 (recipe {parallel.fp8_recipe!r}) needs a GPU of compute capability >= {need[0]}.{need[1]} "
                f"for FP8 GEMMs; this one is {_capability_name()}"
            )
    if te:
        version = _te_version()
        if version is None:
            raise ConfigError("fp8 with transformer_impl='transformer_engine' needs Transformer Engine installed")
        needed = TE_MIN_VERSION_FOR[parallel.fp8_recipe]
        if version < needed:
            raise ConfigError(
                f"fp8_recipe={parallel.fp8_recipe!r} needs Transformer Engine >= {'.'.join(map(str, needed))}, "
                f"found {'.'.join(map(str, version))}"
            )


__all__ = [
    "E4M3",
    "E5M2",
    "FP8_RECIPES",
    "FP8ColumnParallelLinear",
    "FP8Recipe",
    "FP8RowParallelLinear",
    "FP8Scaling",
    "check_runtime",
    "fp8_linear",
    "high_precision_layers",
    "quantize",
    "scale_from_amax",
]
