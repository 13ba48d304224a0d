"""looplm.model: the Ouro LoopLM reference model, its objectives, exit policies, KV caches and checkpoint I/O.

This package imports torch (and, under `megatron/`, megatron-core) and nothing else of looplm.
"""

from .checkpoint import CheckpointError, load_pretrained, save_pretrained
from .config import PRESETS, ConfigError, LoopLMConfig
from .exit_policy import ExitPolicy, HiddenDiffExit, QExit, StaticExit, parse_exit_policy, select_exit_steps
from .generation import GenerationOutput, generate
from .kv_cache import STRATEGIES as KV_CACHE_STRATEGIES
from .kv_cache import KVCache
from .looplm import LoopLM, LoopLMOutput, exit_distribution
from .objectives import IGNORE_INDEX, LossOutput, gate_parameters, stage1_loss, stage2_loss

__all__ = [
    "PRESETS",
    "IGNORE_INDEX",
    "KV_CACHE_STRATEGIES",
    "CheckpointError",
    "ConfigError",
    "ExitPolicy",
    "GenerationOutput",
    "HiddenDiffExit",
    "KVCache",
    "LoopLM",
    "LoopLMConfig",
    "LoopLMOutput",
    "LossOutput",
    "QExit",
    "StaticExit",
    "exit_distribution",
    "gate_parameters",
    "generate",
    "load_pretrained",
    "parse_exit_policy",
    "save_pretrained",
    "select_exit_steps",
    "stage1_loss",
    "stage2_loss",
]
