"""What each step hands to the next: small frozen records, written as JSON beside the step's files (_RECORD.json).

Paths in a record are relative to the step's output folder, so an output folder can be copied to another root
(or read from a shared filesystem) and still mean the same thing; the executor gives each step its inputs'
records with the local folder they are in (`Upstream.path(record.field)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CuratedData:
    """curate: the mixture manifest (datasets, weights, splits, token counts) and the tokenizer."""

    folder: str  # the curated folder (what data.manifest names): mixture.json, tokenizer.json, megatron/
    manifest: str  # mixture.json
    tokenizer: str  # tokenizer.json
    vocab_size: int
    eod_id: int
    # source -> {"weight", "train_tokens", "valid_tokens", "train_documents", "valid_documents"}
    datasets: dict[str, dict[str, float]] = field(default_factory=dict)
    documents_kept: int = 0
    documents_removed: int = 0


@dataclass(frozen=True)
class TrainedModel:
    """pretrain (Stage I or II): the last training checkpoint and the Ouro HF export with its tokenizer."""

    checkpoint: str  # checkpoints/step_<n> (megatron dist-checkpoint, optimizer state included)
    hf: str  # hf/: config.json, model.safetensors, tokenizer.json
    steps: int
    objective: str
    final_loss: float
    valid_loss: float | None


@dataclass(frozen=True)
class UpcycledModel:
    """upcycle: an Ouro HF folder with each layer duplicated (Ouro 1.4B -> 2.6B)."""

    hf: str
    num_hidden_layers: int


@dataclass(frozen=True)
class EvalMetrics:
    """evaluate: the headline metrics (at the trained number of recurrent steps) and the full table."""

    metrics: dict[str, float]
    table: str  # eval_table.json: every row behind the plots
    trained_steps: int


@dataclass(frozen=True)
class RegisteredModel:
    """register: the model's URI in the MLflow registry."""

    model_uri: str  # models:/NAME/VERSION
    name: str
    version: int
    alias: str | None


@dataclass(frozen=True)
class Endpoint:
    """deploy: the OpenAI-compatible endpoint serving the model (live only while its Ray cluster runs)."""

    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str  # the model name clients ask for
    served: str  # what it serves: a models:/ URI or an HF folder
    kv_cache: str


@dataclass(frozen=True)
class StudyRunResult:
    """study_train, one model and seed: its trained export and every measurement by recurrent pass."""

    model: str  # the model's name in the study (looped, iso_param, ...)
    seed: int
    hf: str  # hf/: the trained model (after Stage II when the study trains a gate) with its tokenizer
    num_layers: int
    total_ut_steps: int  # T it was trained with
    parameters: int
    flops_by_pass: list[float]  # forward FLOPs per token at 1..max_passes passes
    exact_match: list[float]  # held-out composed questions, at 1..max_passes passes
    train_exact_match: list[float]  # training questions, same passes
    val_loss: list[float]  # held-out question text, same passes
    exit_curves: list[dict] = field(default_factory=list)  # {policy, gate, threshold, avg_steps, exact_match}
    kv: dict[str, dict[str, float]] = field(default_factory=dict)  # strategy -> {nll, nll_gap, agreement, ...}
    final_loss: float = float("nan")
    train_seconds: float = 0.0


@dataclass(frozen=True)
class StudyReport:
    """study_report: the aggregate over seeds, the gaps with their confidence intervals, the plots."""

    summary: str  # study.md: the tables
    table: str  # study.json: every aggregate number
    plots: list[str] = field(default_factory=list)  # PNG files in the step folder
    gaps: dict[str, dict[str, float]] = field(default_factory=dict)  # "a-b" -> {gap, low, high, n_a, n_b, ...}
