"""One run of a controlled study (ouro-spec.md §8.3, issue 14): a LoopLM trained on the multi-hop QA corpus with
the reference trainer, then measured at every number of recurrent passes.

    run = StudyRun(name="looped", seed=0, data=MultiHopData(), model={...}, training={...})
    result = train_and_measure(run, output=Path("runs/x"), log=print)

Design choices:
- Data: the curation generators' relation world (`synthetic.multihop_world`), all atomic facts plus a fraction of
  the k-hop questions in training, held-out k-hop questions for the test. The world depends on `data.seed` only,
  so every model and seed of a study sees the same facts and the same test questions.
- A word-level tokenizer (the `tokenizers` library's WordLevel): every person, relation and template word is
  one token, so an answer is one token. Its vocabulary is the sorted set of the corpus's words, so it is the same
  on every machine and run.
- The model and training sections of a study config are passed to `LoopLMConfig(**model)` and
  `TrainSettings(**training)` field by field; an unknown field is a config error naming it. New options of
  either class (loop-robust training) therefore work in a study without a change here.
- What is measured on each model (each a function below, all on held-out data): exact match per pass
  1..max_passes (teacher forcing of the single answer token, which equals greedy decoding), the same on training
  questions (memorisation), validation loss per pass; for a model with a `stage2` section the compute-quality
  curves of early exit at the answer token (Q-exit with the Stage II gate and with the Stage I gate, the
  hidden-state-difference rule, static depth); with `kv_prompts` the KV-sharing gap of `last_step` and `average`
  to `per_step` decoding.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from looplm.model import HiddenDiffExit, LoopLM, LoopLMConfig, QExit, StaticExit, generate, select_exit_steps
from looplm.model.generation import left_pad
from looplm.pipelines import synthetic
from looplm.pipelines.evaluate import hidden_difference_quantiles
from looplm.pipelines.reference_train import TrainSettings, pack_documents, per_step_validation, train

PAD, END_OF_DOCUMENT, UNKNOWN = "<pad>", "<eod>", "<unk>"
TEMPLATE_WORDS = ("The", "of", "is", ".", "Who", "the", "?", "Answer", ":")
# Set by the study from its data and seeds: a config that names them is wrong.
MODEL_FIELDS_SET_HERE = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
TRAINING_FIELDS_SET_HERE = ("seed", "stage")
KV_STRATEGIES = ("per_step", "last_step", "average")
# format -> (facts, question, what a test prompt starts with). A compact question has no words that say where it
# starts; in training every document but a row's first follows <eod>, so a compact prompt starts with it too.
QUESTION_FORMATS = {
    "text": (synthetic.multihop_facts, synthetic.multihop_question, ""),
    "compact": (synthetic.multihop_compact_facts, synthetic.multihop_compact_question, f"{END_OF_DOCUMENT} "),
}


class StudyConfigError(ValueError):
    """A study's model or training section that the model or trainer does not accept; names the field."""


@dataclass(frozen=True)
class MultiHopData:
    """The relation world and the train/test split of its k-hop questions (see `synthetic.multihop_split`)."""

    seed: int = 0
    num_layers: int = 4  # layers of people; k-hop questions need num_layers > hops
    per_layer: int = 20
    num_relations: int = 16
    hops: int = 2
    train_fraction: float = 0.3  # of all per_layer x relations^hops questions, in training
    test_questions: int = 1000  # held out, never trained on
    seq_len: int = 32  # packed training rows
    # text: 'The mentor of A is B.', 'Who is the mentor of the teacher of A?\nAnswer: C' (7 and 13 tokens).
    # compact: 'A mentor B', 'A teacher mentor C' (3 and 4 tokens): the same facts and questions in a third of
    # the tokens, so the same compute sees each example three times as often.
    format: str = "text"
    # The documents are shuffled and packed this many times over (each a different order): with one packing the
    # same rows repeat every epoch and a small model spends its capacity learning which document follows which.
    packings: int = 1

    def __post_init__(self) -> None:
        if self.packings < 1:
            raise ValueError(f"packings must be at least 1, got {self.packings}")
        if self.format not in QUESTION_FORMATS:
            raise ValueError(f"format must be one of {', '.join(QUESTION_FORMATS)}, got {self.format!r}")
        if self.hops < 1 or self.hops >= self.num_layers:
            raise ValueError(f"hops must lie in 1..num_layers-1 ({self.num_layers - 1}), got {self.hops}")
        if not 0.0 <= self.train_fraction < 1.0:
            raise ValueError(f"train_fraction must lie in [0, 1), got {self.train_fraction}")
        if self.train_questions + self.test_questions > self.total_questions:
            raise ValueError(
                f"{self.train_questions} train + {self.test_questions} test questions asked for, only "
                f"{self.total_questions} {self.hops}-hop questions exist"
            )

    @property
    def total_questions(self) -> int:
        return self.per_layer * self.num_relations**self.hops

    @property
    def train_questions(self) -> int:
        return round(self.train_fraction * self.total_questions)


@dataclass(frozen=True)
class StudyEval:
    max_passes: int = 6  # exact match and validation loss at 1..max_passes recurrent passes
    train_questions: int = 500  # training questions scored too (memorisation against composition)
    loss_rows: int = 64  # packed rows of held-out question text for the per-pass validation loss
    batch_size: int = 64
    q_thresholds: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
    hdiff_quantiles: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
    kv_prompts: int = 0  # held-out questions decoded with each KV strategy; 0: no KV-sharing measurement
    kv_new_tokens: int = 24

    def __post_init__(self) -> None:
        if self.max_passes < 1:
            raise ValueError(f"max_passes must be at least 1, got {self.max_passes}")


@dataclass(frozen=True)
class StudyRun:
    """One model and seed of a study: what the executor hashes and caches as one step."""

    name: str  # the model's name in the study (looped, iso_param, ...)
    seed: int
    data: MultiHopData = field(default_factory=MultiHopData)
    model: dict[str, Any] = field(default_factory=dict)  # LoopLMConfig fields
    training: dict[str, Any] = field(default_factory=dict)  # TrainSettings fields
    stage2: dict[str, Any] | None = None  # TrainSettings fields of a Stage II gate run; None: no early-exit curves
    eval: StudyEval = field(default_factory=StudyEval)


# ---------------------------------------------------------------- config sections, field by field


def _known(cls: type, section: dict[str, Any], reserved: tuple[str, ...], where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(section) - names)
    if unknown:
        raise StudyConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)} of {cls.__name__}; known: {', '.join(sorted(names))}"
        )
    taken = sorted(set(section) & set(reserved))
    if taken:
        raise StudyConfigError(f"{where}: {', '.join(taken)} is set by the study, not by its config")


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def model_config(section: dict[str, Any], vocab_size: int, pad_id: int, eod_id: int, where: str) -> LoopLMConfig:
    """`LoopLMConfig(**section)` with the vocabulary's size and ids; errors name the field."""
    _known(LoopLMConfig, section, MODEL_FIELDS_SET_HERE, where)
    ids = {"vocab_size": vocab_size, "bos_token_id": eod_id, "eos_token_id": eod_id, "pad_token_id": pad_id}
    try:
        return LoopLMConfig(**{k: _tuples(v) for k, v in section.items()}, **ids)
    except (TypeError, ValueError) as err:
        raise StudyConfigError(f"{where}: {err}") from None


def train_settings(section: dict[str, Any], seed: int, stage: str, where: str) -> TrainSettings:
    """`TrainSettings(**section)` for this seed and stage; errors name the field."""
    _known(TrainSettings, section, TRAINING_FIELDS_SET_HERE, where)
    try:
        return TrainSettings(**{k: _tuples(v) for k, v in section.items()}, seed=seed, stage=stage)
    except (TypeError, ValueError) as err:
        raise StudyConfigError(f"{where}: {err}") from None


def check_run(run: StudyRun, where: str) -> None:
    """Build the run's model config and training settings once, so a bad field fails when the study is loaded."""
    model_config(run.model, vocab_size=64, pad_id=0, eod_id=1, where=f"{where}.model")
    train_settings(run.training, run.seed, "stage1", f"{where}.training")
    if run.stage2 is not None:
        train_settings(run.stage2, run.seed, "stage2", f"{where}.stage2")


# ---------------------------------------------------------------- data and tokenizer


@dataclass(frozen=True)
class StudyData:
    tokenizer: Any  # tokenizers.Tokenizer
    train_rows: torch.Tensor  # packed [n, seq_len + 1]
    valid_rows: torch.Tensor  # held-out question text, packed the same way
    test: list[tuple[str, str]]  # held-out (question, " answer")
    train_items: list[tuple[str, str]]  # training questions, same form
    pad_id: int
    eod_id: int


def word_tokenizer(words: list[str]) -> Any:
    """Word-level: specials first (<pad> 0, <eod> 1, <unk> 2), then the sorted words; splits on spaces and
    punctuation, so "A?" is two tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate([PAD, END_OF_DOCUMENT, UNKNOWN, *sorted(set(words))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer.add_special_tokens([PAD, END_OF_DOCUMENT, UNKNOWN])
    return tokenizer


def build_data(data: MultiHopData, eval_settings: StudyEval) -> StudyData:
    """Facts and training questions packed for training; held-out questions for the test (deterministic)."""
    world = synthetic.multihop_world(
        seed=data.seed, num_layers=data.num_layers, per_layer=data.per_layer, num_relations=data.num_relations
    )
    facts, question, start = QUESTION_FORMATS[data.format]
    train_qa, test_qa = synthetic.multihop_split(
        world, data.hops, data.train_questions, data.test_questions, data.seed, question=question
    )
    words = [*TEMPLATE_WORDS, *world.relations, *(p for layer in world.layers for p in layer)]
    tokenizer = word_tokenizer(words)
    pad_id, eod_id = tokenizer.token_to_id(PAD), tokenizer.token_to_id(END_OF_DOCUMENT)
    documents = facts(world) + [qa.text for qa in train_qa]
    encoded = [e.ids for e in tokenizer.encode_batch(documents)]
    if any(tokenizer.token_to_id(UNKNOWN) in ids for ids in encoded):
        raise RuntimeError("the study tokenizer does not cover its own corpus")  # a bug here, not a user error
    order = random.Random(data.seed + 1)
    packings = []
    for _ in range(data.packings):
        order.shuffle(encoded)
        packings.append(pack_documents(encoded, eod_id, data.seq_len))
    train_rows = torch.cat(packings)
    valid_texts = [qa.text for qa in test_qa]
    valid_rows = pack_documents((e.ids for e in tokenizer.encode_batch(valid_texts)), eod_id, data.seq_len)
    return StudyData(
        tokenizer=tokenizer,
        train_rows=train_rows,
        valid_rows=valid_rows[: eval_settings.loss_rows],
        test=[(start + qa.question, f" {qa.answer}") for qa in test_qa],
        train_items=[(start + qa.question, f" {qa.answer}") for qa in train_qa[: eval_settings.train_questions]],
        pad_id=pad_id,
        eod_id=eod_id,
    )


# ---------------------------------------------------------------- measurements


@dataclass
class AnswerStates:
    """At the position that predicts each item's (single-token) answer, per pass t = 1..T: h_t, the gate logit,
    and whether the argmax is the answer."""

    hidden: list[torch.Tensor]  # T x [n, d]
    gate_logits: torch.Tensor  # [n, T]
    correct: torch.Tensor  # [n, T] bool


@torch.no_grad()
def answer_states(model: LoopLM, tokenizer: Any, items: list[tuple[str, str]], passes: int, batch_size: int):
    hidden: list[list[torch.Tensor]] = [[] for _ in range(passes)]
    gates, correct = [], []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        prompts = [tokenizer.encode(prompt).ids for prompt, _ in batch]
        answers = [tokenizer.encode(answer).ids for _, answer in batch]
        if any(len(a) != 1 for a in answers):
            raise ValueError("study answers must be one token each (a word-level tokenizer makes names one token)")
        ids, mask = left_pad(prompts, model.config.pad_token_id)
        out = model(ids, passes, attention_mask=mask, return_logits=False)
        target = torch.tensor([a[0] for a in answers])
        last = [h[:, -1] for h in out.hidden_states]
        for t, h in enumerate(last):
            hidden[t].append(h)
        gates.append(out.gate_logits[:, -1])
        correct.append(torch.stack([model.lm_head(h).argmax(-1) == target for h in last], dim=-1))
    return AnswerStates([torch.cat(h) for h in hidden], torch.cat(gates), torch.cat(correct))


def exact_match_by_pass(states: AnswerStates) -> list[float]:
    """Fraction of items answered exactly at each pass (the answer is one token, so this is greedy decoding)."""
    return states.correct.double().mean(0).tolist()


def exit_curves(
    states: AnswerStates, stage1_gate_logits: torch.Tensor | None, settings: StudyEval
) -> list[dict[str, Any]]:
    """Compute-quality points at the answer token over the trained T passes: (policy, gate, threshold,
    avg_steps, exact_match) for static depth, Q-exit with the model's gate (and the Stage I gate's logits when
    given, on the same frozen hidden states) and the hidden-state-difference rule."""
    steps = len(states.hidden)
    rows = []

    def point(policy_name: str, gate: str, threshold: float, policy: Any, gate_logits: torch.Tensor) -> None:
        exit_steps = select_exit_steps(states.hidden, gate_logits, policy)
        picked = states.correct.gather(1, (exit_steps - 1)[:, None]).squeeze(1)
        rows.append(
            {
                "policy": policy_name,
                "gate": gate,
                "threshold": float(threshold),
                "avg_steps": float(exit_steps.double().mean()),
                "exact_match": float(picked.double().mean()),
            }
        )

    for t in range(1, steps + 1):
        point("static", "", t, StaticExit(t), states.gate_logits)
    for q in settings.q_thresholds:
        point("qexit", "stage2", q, QExit(q), states.gate_logits)
        if stage1_gate_logits is not None:
            point("qexit", "stage1", q, QExit(q), stage1_gate_logits)
    for eps in hidden_difference_quantiles(states.hidden, settings.hdiff_quantiles):
        point("hdiff", "", eps, HiddenDiffExit(eps), states.gate_logits)
    return rows


@torch.no_grad()
def continuation_nll(model: LoopLM, prompts: list[list[int]], continuations: list[list[int]]) -> list[float]:
    """Mean NLL per token of each continuation after its prompt, by full recomputation at the model's T (no cache)."""
    sequences = [p + c for p, c in zip(prompts, continuations, strict=True)]
    ids, mask = left_pad(sequences, model.config.pad_token_id)
    out = model(ids, attention_mask=mask, return_logits=False)
    logprobs = torch.log_softmax(model.lm_head(out.hidden_states[-1]).float(), -1)
    width = ids.shape[1]
    scores = []
    for row, continuation in enumerate(continuations):
        first = width - len(continuation)  # the first continuation token's position; position p - 1 predicts it
        targets = torch.tensor(continuation)
        picked = logprobs[row, first - 1 : width - 1].gather(-1, targets[:, None]).squeeze(-1)
        scores.append(float(-picked.mean()))
    return scores


def kv_sharing(model: LoopLM, tokenizer: Any, items: list[tuple[str, str]], new_tokens: int) -> dict[str, dict]:
    """Greedy continuations of held-out questions with each KV strategy: NLL by full recomputation, token
    agreement with `per_step` and the first position where they differ (new_tokens when never)."""
    prompts = [tokenizer.encode(question).ids for question, _ in items]
    outputs = {
        strategy: generate(model, prompts, max_new_tokens=new_tokens, kv_cache=strategy).tokens
        for strategy in KV_STRATEGIES
    }
    reference = outputs["per_step"]
    result: dict[str, dict] = {}
    for strategy, tokens in outputs.items():
        nll = continuation_nll(model, prompts, tokens)
        same, first = [], []
        for ours, theirs in zip(tokens, reference, strict=True):  # no stop tokens: every row has the same length
            matches = [a == b for a, b in zip(ours, theirs, strict=True)]
            same.append(sum(matches) / max(len(matches), 1))
            first.append(matches.index(False) if False in matches else new_tokens)
        result[strategy] = {
            "nll": sum(nll) / len(nll),
            "agreement": sum(same) / len(same),
            "first_divergence": sum(first) / len(first),
        }
    base = result["per_step"]["nll"]
    for strategy in result:
        result[strategy]["nll_gap"] = result[strategy]["nll"] / base - 1.0 if base > 0 else math.nan
    return result


# ---------------------------------------------------------------- one run


@dataclass
class StudyResult:
    num_layers: int
    total_ut_steps: int
    parameters: int
    flops_by_pass: list[float]  # forward FLOPs per token at 1..max_passes passes (LM head once)
    exact_match: list[float]  # held-out, by pass 1..max_passes
    train_exact_match: list[float]
    val_loss: list[float]
    exit_curves: list[dict[str, Any]]
    kv: dict[str, dict[str, float]]
    final_loss: float
    train_seconds: float
    history: list[dict[str, Any]]  # the trainer's logged records (Stage I, then Stage II with "stage": 2)


def train_and_measure(run: StudyRun, output: Path, log: Callable[[dict], None] | None = None) -> StudyResult:
    """Train one model and seed (Stage I, then Stage II when configured), save it under output/hf, measure it."""
    data = build_data(run.data, run.eval)
    config = model_config(
        run.model, data.tokenizer.get_vocab_size(), data.pad_id, data.eod_id, f"models.{run.name}.model"
    )
    torch.manual_seed(run.seed)
    model = LoopLM(config)
    started = time.perf_counter()
    history = train(model, data.train_rows, train_settings(run.training, run.seed, "stage1", "training"), log)
    stage1_gate = None
    if run.stage2 is not None:
        stage1_gate = copy.deepcopy(model.model.early_exit_gate)
        gate_log = None if log is None else (lambda record: log({**record, "stage": 2}))
        settings = train_settings(run.stage2, run.seed, "stage2", "stage2")
        history += [{**r, "stage": 2} for r in train(model, data.train_rows, settings, gate_log)]
    seconds = time.perf_counter() - started
    model.eval()
    model.save_pretrained(output / "hf", tokenizer=data.tokenizer, overwrite=True)

    passes = run.eval.max_passes
    states = answer_states(model, data.tokenizer, data.test, passes, run.eval.batch_size)
    train_states = (
        answer_states(model, data.tokenizer, data.train_items, passes, run.eval.batch_size)
        if (data.train_items)
        else None
    )
    curves: list[dict[str, Any]] = []
    if run.stage2 is not None:
        trained = config.total_ut_steps
        at_t = AnswerStates(states.hidden[:trained], states.gate_logits[:, :trained], states.correct[:, :trained])
        with torch.no_grad():
            stage1_logits = torch.stack([stage1_gate(h).squeeze(-1) for h in at_t.hidden], dim=-1)
        curves = exit_curves(at_t, stage1_logits, run.eval)
    kv = {}
    if run.eval.kv_prompts:
        kv = kv_sharing(model, data.tokenizer, data.test[: run.eval.kv_prompts], run.eval.kv_new_tokens)
    seq_len = run.data.seq_len
    stage1 = [r for r in history if r.get("stage") != 2]
    return StudyResult(
        num_layers=config.num_hidden_layers,
        total_ut_steps=config.total_ut_steps,
        parameters=config.num_parameters(),
        flops_by_pass=[config.flops_per_token(seq_len, t, 1)["forward"] for t in range(1, passes + 1)],
        exact_match=exact_match_by_pass(states),
        train_exact_match=exact_match_by_pass(train_states) if train_states is not None else [],
        val_loss=per_step_validation(model, data.valid_rows, passes, run.eval.batch_size).tolist(),
        exit_curves=curves,
        kv=kv,
        final_loss=float(stage1[-1]["loss"]) if stage1 else math.nan,
        train_seconds=seconds,
        history=history,
    )
