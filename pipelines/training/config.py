"""The pretraining config: frozen dataclasses that experiment YAML (configs/train-*.yaml) maps onto.

    cfg = load_config(PretrainConfig, "configs/train-tiny-cpu.yaml", ["train.steps=50"])

Schedules of the loop are piecewise constant in the optimizer step, written as [[from_step, value], ...]:
Ouro's recipe drops T from 8 to 4 and beta from 0.1 to 0.05 between stages (ouro-spec.md §6.1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from looplm.model.config import ConfigError, LoopLMConfig
from looplm.model.megatron.config import ParallelConfig

LR_SCHEDULES = ("warmup_constant", "wsd", "cosine")
OPTIMIZER_IMPLEMENTATIONS = ("auto", "megatron", "torch")
OBJECTIVES = ("stage1", "stage2")
DATA_GENERATORS = ("synthetic",)  # data.generator: the counting + motif corpus of training/data.py


def _check_piecewise(name: str, table: tuple) -> None:
    if not table or table[0][0] != 0:
        raise ConfigError(f"{name} must start at step 0, got {table!r}")
    starts = [row[0] for row in table]
    if starts != sorted(set(starts)):
        raise ConfigError(f"{name} steps must be strictly increasing, got {starts}")


@dataclass(frozen=True)
class ModelSection:
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # LoopLMConfig fields, e.g. {rope_theta: 40000.0}

    def build(self) -> LoopLMConfig:
        return LoopLMConfig.preset(self.preset, **self.overrides)


@dataclass(frozen=True)
class DataConfig:
    # Exactly one source of training data; none is an error (nothing is trained on generated data by default):
    # - manifest: a curated folder (`looplm curate`'s output: mixture.json, tokenizer.json, megatron/*.bin/.idx);
    #   its datasets, mixture weights, train/valid splits, end-of-document id and tokenizer are used as they are;
    # - paths: Megatron indexed datasets (.bin/.idx path prefixes) and their mixture weights, split by `split`;
    # - generator: "synthetic", a small learnable corpus written into the run folder (CPU runs and tests).
    manifest: str | None = None
    paths: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    generator: str | None = None
    split: str = "98,2,0"  # train, valid, test shares of each dataset's documents
    seq_len: int = 128
    micro_batch_size: int = 4  # sequences per DP rank per forward/backward
    global_batch_size: int = 8  # sequences per optimizer step over all DP ranks (the rest is accumulation)
    # Batch-size ramp-up as Megatron-LM's --rampup-batch-size: [start, increment, ramp_samples]. The global batch
    # starts at `start` sequences and grows by `increment` in equal shares of the first `ramp_samples` samples
    # until it reaches global_batch_size (Ouro ramped 4M -> 8M tokens in Stage 1a). null: no ramp.
    rampup_batch_size: tuple[int, int, int] | None = None
    eod_token: int = 0  # with a manifest: the manifest's end-of-document id
    seed: int = 1234

    def __post_init__(self) -> None:
        named = [
            name
            for name, value in (("manifest", self.manifest), ("paths", self.paths), ("generator", self.generator))
            if value
        ]
        if len(named) != 1:
            raise ConfigError(
                "data: name exactly one source of training data: data.manifest (a curated folder), data.paths "
                f"(indexed dataset prefixes) or data.generator ({' | '.join(DATA_GENERATORS)}); "
                + (f"got {' and '.join(named)}" if named else "got none")
            )
        if self.generator is not None and self.generator not in DATA_GENERATORS:
            raise ConfigError(f"data.generator must be one of {DATA_GENERATORS}, got {self.generator!r}")
        if self.weights and len(self.weights) != len(self.paths):
            raise ConfigError(f"data.weights has {len(self.weights)} entries for {len(self.paths)} data.paths")
        if self.seq_len < 2 or self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ConfigError("data.seq_len must be >= 2 and the batch sizes positive")
        if self.rampup_batch_size is not None:
            start, increment, samples = self.rampup_batch_size
            if not 0 < start <= self.global_batch_size or increment < 1 or samples < 0:
                raise ConfigError(
                    f"data.rampup_batch_size [start, increment, ramp_samples] needs 0 < start <= global_batch_size, "
                    f"increment >= 1 and ramp_samples >= 0, got {list(self.rampup_batch_size)}"
                )
            if (self.global_batch_size - start) % increment:
                raise ConfigError(
                    f"data.rampup_batch_size: global_batch_size - start ({self.global_batch_size - start}) is not a "
                    f"multiple of the increment ({increment})"
                )


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5  # the end of a decay (wsd, cosine)
    schedule: str = "warmup_constant"  # warmup_constant | wsd (warmup-stable-decay) | cosine
    warmup_steps: int = 100
    decay_steps: int = 0  # wsd: length of the final decay; cosine: 0 means "to the last step"
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # megatron: megatron-core's optimizer (every GPU run); torch: torch AdamW over DDP gradients (fp32 only);
    # auto: megatron with CUDA or bf16 params, torch otherwise. See pipelines/training/optimizer.py.
    implementation: str = "auto"
    distributed: bool = True  # megatron only: the DistributedOptimizer (optimizer state sharded over DP)

    def __post_init__(self) -> None:
        if self.implementation not in OPTIMIZER_IMPLEMENTATIONS:
            raise ConfigError(
                f"optim.implementation must be one of {OPTIMIZER_IMPLEMENTATIONS}, got {self.implementation!r}"
            )
        if self.schedule not in LR_SCHEDULES:
            raise ConfigError(f"optim.schedule must be one of {LR_SCHEDULES}, got {self.schedule!r}")
        if self.lr <= 0 or self.min_lr < 0 or self.warmup_steps < 0 or self.decay_steps < 0:
            raise ConfigError("optim.lr must be positive, min_lr, warmup_steps and decay_steps non-negative")


@dataclass(frozen=True)
class LoopSchedule:
    recurrent_steps: tuple[tuple[int, int], ...] = ((0, 4),)  # [[from_step, T], ...]
    beta: tuple[tuple[int, float], ...] = ((0, 0.05),)  # [[from_step, beta], ...] (Stage I entropy weight)
    # Loop-robust training (not in Ouro; looplm.model.objectives). random_steps: [lo, hi], each optimizer step's T
    # drawn uniformly from lo..hi (a function of train.seed and the step: schedules.drawn_recurrent_steps), in
    # place of recurrent_steps, which then sets only the final validation's T. null: recurrent_steps.
    random_steps: tuple[int, int] | None = None
    contraction_penalty: float = 0.0  # weight of the last pass's contraction estimate (Stage I, PP = 1)
    kv_consistency: float = 0.0  # weight of the step-t vs step-T keys/values term (Stage I, PP = 1, no recompute)

    def __post_init__(self) -> None:
        _check_piecewise("loop.recurrent_steps", self.recurrent_steps)
        _check_piecewise("loop.beta", self.beta)
        if any(t < 1 for _, t in self.recurrent_steps):
            raise ConfigError(f"loop.recurrent_steps values must be >= 1, got {self.recurrent_steps!r}")
        if self.random_steps is not None:
            low, high = self.random_steps
            if not 1 <= low <= high:
                raise ConfigError(f"loop.random_steps [lo, hi] needs 1 <= lo <= hi, got {list(self.random_steps)}")
        for name in ("contraction_penalty", "kv_consistency"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):
                raise ConfigError(f"loop.{name} must be a finite weight >= 0, got {value!r}")

    @property
    def penalties(self) -> tuple[str, ...]:
        """The loop-robust loss terms this schedule switches on (their config names)."""
        return tuple(name for name in ("contraction_penalty", "kv_consistency") if getattr(self, name) > 0)

    def penalties_on(self, term: str) -> bool:
        """Whether the term `contraction` or `kv_consistency` (as logged) is switched on."""
        return {"contraction": self.contraction_penalty, "kv_consistency": self.kv_consistency}[term] > 0


@dataclass(frozen=True)
class TrainLoopConfig:
    steps: int = 100
    objective: str = "stage1"  # stage1: LM and gate; stage2: gate only, LM frozen
    log_interval: int = 10
    checkpoint_interval: int = 50
    keep_checkpoints: int | None = None  # the newest N complete checkpoints are kept; None keeps them all
    max_nonfinite_in_a_row: int = 5  # K: that many skipped steps in a row abort the run
    init_from_hf: str | None = None  # an Ouro HF folder to start from (fine-tuning, or Stage II after Stage I)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"train.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.steps < 1 or self.log_interval < 1 or self.checkpoint_interval < 1 or self.max_nonfinite_in_a_row < 1:
            raise ConfigError("train.steps, log_interval, checkpoint_interval and max_nonfinite_in_a_row must be >= 1")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints must be >= 1 or null, got {self.keep_checkpoints}")


@dataclass(frozen=True)
class LaunchConfig:
    data_parallel: int = 1  # Ray Train workers = tensor_parallel x pipeline_parallel x data_parallel
    max_failures: int = 1  # FailureConfig: restarts of the worker group, each resuming from the latest checkpoint
    report_interval: int = 0  # steps between ray.train.report calls; 0: the log interval
    # The network interface (e.g. "eth0") gloo / NCCL bind on a multi-node job (GLOO_SOCKET_IFNAME,
    # NCCL_SOCKET_IFNAME). null: a job whose workers share one node uses loopback and a file rendezvous (no
    # TCP beyond 127.0.0.1); a multi-node job, the libraries' own choice.
    network_interface: str | None = None


@dataclass(frozen=True)
class PretrainConfig:
    name: str = "pretrain"
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopSchedule = field(default_factory=LoopSchedule)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        self.parallel.check_model(self.model.build())
        per_step = self.data.micro_batch_size * self.launch.data_parallel
        if self.data.global_batch_size % per_step:
            raise ConfigError(
                f"data.global_batch_size ({self.data.global_batch_size}) is not a multiple of "
                f"micro_batch_size x launch.data_parallel ({per_step})"
            )
        if self.data.rampup_batch_size is not None:
            start, increment, _ = self.data.rampup_batch_size
            if start % per_step or increment % per_step:
                raise ConfigError(
                    f"data.rampup_batch_size: start ({start}) and increment ({increment}) must be multiples of "
                    f"micro_batch_size x launch.data_parallel ({per_step})"
                )
        if self.parallel.pipeline_parallel > 1:
            self._check_pipeline(per_step)
        self._check_loop_penalties()
        if self.optim.implementation == "torch" and self.parallel.precision == "bf16":
            raise ConfigError(
                "optim.implementation='torch' steps fp32 params only; parallel.precision='bf16' needs "
                "optim.implementation='megatron' (fp32 main params)"
            )
        if self.data.seq_len > self.model.build().max_position_embeddings:
            raise ConfigError("data.seq_len is longer than the model's max_position_embeddings")

    def _check_loop_penalties(self) -> None:
        """What the loop-robust loss terms need of the rest of the config."""
        for name in self.loop.penalties:
            if self.train.objective != "stage1":
                raise ConfigError(
                    f"loop.{name} is a Stage I term; train.objective={self.train.objective!r} trains the exit gate "
                    f"alone: set loop.{name}=0"
                )
            if self.parallel.pipeline_parallel > 1:
                raise ConfigError(
                    f"loop.{name} does not run under pipeline parallelism (parallel.pipeline_parallel="
                    f"{self.parallel.pipeline_parallel}): the term would have to travel the loop's ring of stages; "
                    "run it with parallel.pipeline_parallel=1"
                )
        if self.loop.kv_consistency > 0 and self.parallel.recompute != "none":
            raise ConfigError(
                f"loop.kv_consistency needs parallel.recompute='none', got {self.parallel.recompute!r}: a recomputed "
                "pass keeps no keys and values with their gradient"
            )

    def _check_pipeline(self, per_step: int) -> None:
        """What the looped pipeline (looplm.model.megatron.pipeline) needs of the rest of the config."""
        stages = self.parallel.pipeline_parallel
        if self.train.objective != "stage1":
            raise ConfigError(
                f"parallel.pipeline_parallel={stages} runs the Stage I objective only; train.objective="
                f"{self.train.objective!r} trains the exit gate alone: run it with parallel.pipeline_parallel=1"
            )
        smallest = self.data.global_batch_size
        if self.data.rampup_batch_size is not None:
            smallest = self.data.rampup_batch_size[0]
        if smallest // per_step < stages:
            raise ConfigError(
                f"parallel.pipeline_parallel={stages} needs at least {stages} micro-batches per step on each DP rank "
                f"(megatron's interleaved schedule), but the smallest global batch ({smallest}) / "
                f"(micro_batch_size x launch.data_parallel = {per_step}) gives {smallest // per_step}"
            )

    @property
    def world_size(self) -> int:
        return self.parallel.tensor_parallel * self.parallel.pipeline_parallel * self.launch.data_parallel

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per DP rank per optimizer step at the full global batch."""
        return self.data.global_batch_size // (self.data.micro_batch_size * self.launch.data_parallel)

    def replace(self, **sections: Any) -> PretrainConfig:
        return dataclasses.replace(self, **sections)
