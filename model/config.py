"""The LoopLM configuration: one frozen dataclass, the published Ouro presets, the parameter and FLOP counts.

Field names follow the Ouro HF `config.json` (ouro-spec.md §9.1) so that a released checkpoint's config maps
onto this class one to one; `to_hf_dict` / `from_hf_dict` do that mapping.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A LoopLM configuration that cannot describe a model; the message names the field."""


@dataclass(frozen=True)
class LoopLMConfig:
    vocab_size: int = 49152
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int | None = None  # None: hidden_size // num_attention_heads, as the official code does
    max_position_embeddings: int = 65536
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    total_ut_steps: int = 4  # T, the recurrent steps the model was trained with; any T can be run
    early_exit_threshold: float = 1.0  # q of the Q-exit rule; 1.0 runs every step
    initializer_range: float = 0.02
    bos_token_id: int = 0
    eos_token_id: int = 0
    pad_token_id: int = 0
    # Not in Ouro (looplm's loop-robust option, looplm.py): every pass after the first starts from
    # h_{t-1} + rms_normalize(embedding). Written to config.json only when true, so Ouro checkpoints are unchanged.
    reinject_embedding: bool = False

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.total_ut_steps < 1:
            raise ConfigError(f"total_ut_steps (T) must be at least 1, got {self.total_ut_steps}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) does not divide hidden_size ({self.hidden_size})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads ({self.num_key_value_heads}) does not divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
            raise ConfigError(f"head_dim must be an even integer (RoPE rotates pairs), got {self.head_dim}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ConfigError("rope_theta and rms_norm_eps must be positive")
        if not 0.0 <= self.early_exit_threshold <= 1.0:
            raise ConfigError(f"early_exit_threshold must lie in [0, 1], got {self.early_exit_threshold}")
        if not isinstance(self.reinject_embedding, bool):
            raise ConfigError(f"reinject_embedding must be true or false, got {self.reinject_embedding!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{name} ({getattr(self, name)}) is outside the vocabulary")

    # ---------------------------------------------------------------- derived sizes

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def layer_parameters(self) -> int:
        """Parameters of one decoder layer (shared by all T steps)."""
        d, hd = self.hidden_size, self.attention_head_dim
        attention = d * self.num_attention_heads * hd * 2 + d * self.num_key_value_heads * hd * 2
        mlp = 3 * d * self.intermediate_size
        return attention + mlp + 4 * d  # four RMSNorm gains: the sandwich

    def num_parameters(self) -> int:
        """Exact parameter count; it does not grow with T (the loop shares weights)."""
        d = self.hidden_size
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * self.layer_parameters + embeddings + d + (d + 1)  # + final norm + gate

    def flops_per_token(
        self, seq_len: int, num_steps: int | None = None, lm_head_steps: int | None = None
    ) -> dict[str, float]:
        """Loop-aware model FLOPs per token, the one count behind every MFU / TFLOP/s figure in looplm.

        Matmuls count 2 FLOPs per multiply-add. Per step and layer: the q/k/v/o and SwiGLU projections, plus
        attention scores and the weighted sum over `seq_len` keys (counted over the full sequence, the
        Megatron/PaLM convention, not halved for the causal mask). The stack runs `num_steps` times (T); the
        LM head and exit gate run `lm_head_steps` times: every step in training (each step's loss is needed),
        once when only the exit step is read out. Backward costs twice the forward.
        """
        steps = self.total_ut_steps if num_steps is None else num_steps
        heads_out = lm_head_steps if lm_head_steps is not None else steps
        d, hd = self.hidden_size, self.attention_head_dim
        projections = 2 * (self.layer_parameters - 4 * d)
        attention = 2 * 2 * seq_len * self.num_attention_heads * hd
        stack = self.num_hidden_layers * steps * (projections + attention)
        heads = heads_out * 2 * (d * self.vocab_size + d)
        forward = float(stack + heads)
        return {"forward": forward, "backward": 2 * forward, "total": 3 * forward}

    # ---------------------------------------------------------------- presets and HF config.json

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LoopLMConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` of an Ouro checkpoint."""
        fields = dataclasses.asdict(self)
        fields["head_dim"] = self.attention_head_dim
        if not self.reinject_embedding:
            del fields["reinject_embedding"]  # an Ouro config.json, byte for byte as before the option existed
        return {
            "architectures": ["OuroForCausalLM"],
            "model_type": "ouro",
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_cache": True,
            "use_sliding_window": False,
            **fields,
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> LoopLMConfig:
        if data.get("model_type") != "ouro":
            raise ConfigError(f"config.json has model_type {data.get('model_type')!r}, expected 'ouro'")
        if data.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json hidden_act {data['hidden_act']!r} is not supported (only 'silu')")
        if data.get("use_sliding_window"):
            raise ConfigError("config.json asks for sliding-window attention, which Ouro models do not use")
        if data.get("rope_scaling"):
            raise ConfigError("config.json asks for RoPE scaling, which Ouro models do not use")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names and v is not None}
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if key not in kwargs:
                raise ConfigError(f"config.json is missing {key!r}")
        kwargs.setdefault("num_key_value_heads", kwargs["num_attention_heads"])
        if kwargs.get("head_dim") == kwargs["hidden_size"] // kwargs["num_attention_heads"]:
            kwargs["head_dim"] = None  # the default, written out explicitly in config.json
        return cls(**kwargs)


_OURO_1_4B = LoopLMConfig()

PRESETS: dict[str, LoopLMConfig] = {
    # The released models (ouro-spec.md §1.1, §9.1).
    "ouro-1.4b": _OURO_1_4B,
    "ouro-2.6b": dataclasses.replace(_OURO_1_4B, num_hidden_layers=48),
    # CPU-sized models with the same shape rules: GQA on, untied, 4 steps.
    "tiny": LoopLMConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10_000.0,
    ),
    "small": LoopLMConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rope_theta=10_000.0,
    ),
}
