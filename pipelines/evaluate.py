"""Evaluate a looped model the way looped models are compared: by recurrent step, by exit threshold, by compute.

    looplm eval configs/eval-demo.yaml model=models:/looplm-tiny/1 max_steps=8

What it measures, on held-out text packed into fixed-length rows:
- per recurrent step t = 1..max_steps (past the trained T: extrapolation): next-token loss, perplexity and
  accuracy, every position read out at step t;
- early exit, per position, over one forward pass of T steps (`select_exit_steps`, the rule decoding uses):
  for each Q-exit threshold q and each hidden-state-difference epsilon, the average exit step, the loss and
  accuracy at the exit step, the forward FLOPs per token that budget costs, and the exit-step histogram; the
  Q-exit curve also for the same LM's Stage I gate (`stage1_model`) beside the model's own (after Stage II);
- task scores through lm-evaluation-harness (`lm_eval_adapter`), once per requested recurrent step;
- exact match per recurrent step on the paper's synthetic reasoning tasks, multi-hop QA and Mano
  (`reasoning_eval`).

Everything goes to the tracking server: per-step metrics with the recurrent step as the MLflow step (so the UI
plots runs against each other by step) and once more under names that carry the step ("val_loss_by_step/t03",
so the compare page, which shows each metric's last value, lines the same t up across runs), threshold curves
with round(100 q) as the step, PNG plots (loss by step, the compute-quality curve, the exit-step histogram) and a
table (CSV and JSON) with every number behind them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from looplm.infra.configs import load_config
from looplm.infra.registry import resolve_model_dir
from looplm.infra.tracking import RunLogger, by_step_metrics, pyplot
from looplm.model import ExitPolicy, HiddenDiffExit, LoopLM, LoopLMConfig, QExit, load_pretrained, select_exit_steps
from looplm.model.checkpoint import read_config_json
from looplm.model.tokenizer import load_tokenizer
from looplm.pipelines.reasoning_eval import ReasoningTasks, reasoning_rows
from looplm.pipelines.reference_train import pack_documents, split_batch


@dataclass(frozen=True)
class EvalData:
    """Held-out text: a .jsonl file ({"text": ...} per line) or a .txt file (one document per line); without a
    path, synthetic bioS biographies of people drawn with `seed` (the demo trains on seed 0's people)."""

    path: str | None = None
    people: int = 200
    exposures: int = 1
    seed: int = 1000
    seq_len: int = 128
    max_sequences: int = 64


@dataclass(frozen=True)
class ExitGrid:
    q_thresholds: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
    hdiff_epsilons: tuple[float, ...] = ()  # empty: the quantiles below of the observed ||h_t - h_{t-1}||
    hdiff_quantiles: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
    histogram_thresholds: tuple[float, ...] = (0.3, 0.5, 0.8)  # Q-exit thresholds drawn in the histogram


@dataclass(frozen=True)
class LmEvalSettings:
    tasks: tuple[str, ...] = ()  # lm-eval task or group names, e.g. looplm_smoke, arc_easy
    steps: tuple[int, ...] = ()  # recurrent steps to run them at; empty: the model's T
    exit_threshold: float = 1.0
    limit: int | None = None  # documents per task (None: all)
    batch_size: int = 16
    task_paths: tuple[str, ...] = ()  # extra folders of task YAMLs


@dataclass(frozen=True)
class EvalConfig:
    model: str = "models:/looplm-demo@demo"  # make demo's model; a checkpoint folder, models:/NAME/VERSION or @ALIAS
    stage1_model: str | None = None  # the same LM before Stage II: its gate's Q-exit curve is drawn too
    max_steps: int | None = None  # per-step sweep up to here; None: 2 T
    batch_size: int = 16
    data: EvalData = field(default_factory=EvalData)
    exits: ExitGrid = field(default_factory=ExitGrid)
    lm_eval: LmEvalSettings = field(default_factory=LmEvalSettings)
    reasoning: ReasoningTasks = field(default_factory=ReasoningTasks)
    experiment: str = "looplm"
    run_name: str = "eval"

    def __post_init__(self) -> None:
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        for q in self.exits.q_thresholds:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"exits.q_thresholds: {q} is not in [0, 1]")
        for q in self.exits.histogram_thresholds:
            if q not in self.exits.q_thresholds:
                raise ValueError(f"exits.histogram_thresholds: {q} is not one of exits.q_thresholds")


# ---------------------------------------------------------------- data


def eval_texts(data: EvalData) -> list[str]:
    """The held-out documents; a malformed file is an error that names the file and line."""
    if data.path is None:
        from looplm.pipelines import synthetic

        return synthetic.biographies(data.people, seed=data.seed, exposures=data.exposures)
    path = Path(data.path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data {path} {'is not a file' if path.exists() else 'not found'}")
    numbered = [(n, line) for n, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    if path.suffix != ".jsonl":
        return [line for _, line in numbered]
    texts = []
    for number, line in numbered:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{number}: expected a JSON object with a string 'text'")
        texts.append(record["text"])
    return texts


def eval_rows(data: EvalData, tokenizer: Any, end_of_document: int) -> torch.Tensor:
    """The held-out text, tokenized and packed into rows of seq_len + 1 tokens."""
    texts = eval_texts(data)
    documents = (encoding.ids for encoding in tokenizer.encode_batch(texts))
    rows = pack_documents(documents, end_of_document, data.seq_len)
    return rows[: data.max_sequences]


# ---------------------------------------------------------------- scoring


@dataclass
class TokenScores:
    """Per-token results over all evaluated positions N: loss and correctness at each step 1..S, and the exit
    step (1..T) each policy picks for each position."""

    loss: torch.Tensor  # [S, N] float32 cross-entropy
    correct: torch.Tensor  # [S, N] bool: the step's argmax is the next token
    exit_steps: dict[str, torch.Tensor]  # policy label -> [N] long


@torch.no_grad()
def score_tokens(
    model: LoopLM,
    rows: torch.Tensor,
    *,
    max_steps: int,
    policies: dict[str, ExitPolicy],
    batch_size: int = 16,
) -> TokenScores:
    """One forward pass of max_steps per batch; exits are decided over the first T steps, as at inference."""
    trained = model.config.total_ut_steps
    losses, corrects, exits = [], [], {label: [] for label in policies}
    for start in range(0, rows.shape[0], batch_size):
        inputs, labels = split_batch(rows[start : start + batch_size])
        out = model(inputs, max(max_steps, trained), return_logits=False)
        step_loss, step_correct = [], []
        for h in out.hidden_states[:max_steps]:
            logits = model.lm_head(h).float()
            step_loss.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none"))
            step_correct.append(logits.argmax(-1) == labels)
        losses.append(torch.stack(step_loss).flatten(1))
        corrects.append(torch.stack(step_correct).flatten(1))
        hidden, gates = out.hidden_states[:trained], out.gate_logits[..., :trained]
        for label, policy in policies.items():
            exits[label].append(select_exit_steps(hidden, gates, policy).flatten())
    return TokenScores(
        loss=torch.cat(losses, dim=1),
        correct=torch.cat(corrects, dim=1),
        exit_steps={label: torch.cat(parts) for label, parts in exits.items()},
    )


@torch.no_grad()
def hidden_difference_grid(model: LoopLM, rows: torch.Tensor, quantiles: tuple[float, ...]) -> tuple[float, ...]:
    """Epsilons for the hidden-state-difference rule: quantiles of ||h_t - h_{t-1}|| (t = 2..T) on `rows`.

    Its scale depends on the model, so a fixed grid would say little; the quantiles span exits from late to early.
    """
    inputs, _ = split_batch(rows)
    return hidden_difference_quantiles(model(inputs, return_logits=False).hidden_states, quantiles)


def hidden_difference_quantiles(hidden: list[torch.Tensor], quantiles: tuple[float, ...]) -> tuple[float, ...]:
    """Quantiles of ||h_t - h_{t-1}|| over every position and t = 2..T of a pass's hidden states; () for T = 1."""
    if len(hidden) < 2:
        return ()
    distances = torch.cat(
        [torch.linalg.vector_norm((b - a).float(), dim=-1).flatten() for a, b in zip(hidden, hidden[1:], strict=False)]
    )
    return tuple(float(v) for v in torch.quantile(distances, torch.tensor(quantiles, dtype=torch.float32)))


def flops_per_token(config: LoopLMConfig, seq_len: int, average_steps: float) -> float:
    """Forward FLOPs per token of a read-out at `average_steps` on average: the stack runs that many times, the
    LM head once. (Linear in the steps, so the average of the costs is the cost of the average.)"""
    stack = config.flops_per_token(seq_len, num_steps=1, lm_head_steps=0)["forward"]
    head = config.flops_per_token(seq_len, num_steps=0, lm_head_steps=1)["forward"]
    return average_steps * stack + head


def _summary(loss: torch.Tensor, correct: torch.Tensor) -> dict[str, float]:
    mean_loss = float(loss.double().mean())
    return {"loss": mean_loss, "ppl": math.exp(mean_loss), "acc": float(correct.double().mean())}


def _at_exit(scores: TokenScores, exit_steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    index = (exit_steps - 1)[None]
    return scores.loss.gather(0, index).squeeze(0), scores.correct.gather(0, index).squeeze(0)


def evaluate_model(
    model: LoopLM,
    rows: torch.Tensor,
    *,
    max_steps: int | None = None,
    exits: ExitGrid = ExitGrid(),
    batch_size: int = 16,
    stage1_model: LoopLM | None = None,
) -> list[dict[str, Any]]:
    """Every number of the per-step and early-exit evaluation, as table rows (see the module docstring).

    Row kinds: "step" (read out at step t), "qexit" and "hdiff" (read out at the exit step). `gate` says whose
    exit gate decided: "model", or "stage1" for `stage1_model`'s.
    """
    config = model.config
    trained = config.total_ut_steps
    steps = max_steps or 2 * trained
    seq_len = rows.shape[1] - 1
    epsilons = exits.hdiff_epsilons or hidden_difference_grid(model, rows[:batch_size], exits.hdiff_quantiles)
    policies: dict[str, ExitPolicy] = {f"q={q}": QExit(q) for q in exits.q_thresholds}
    policies.update({f"hdiff={eps}": HiddenDiffExit(eps) for eps in epsilons})
    scores = score_tokens(model, rows, max_steps=steps, policies=policies, batch_size=batch_size)

    table: list[dict[str, Any]] = []
    for t in range(1, steps + 1):
        row = {"kind": "step", "gate": "", "threshold": float(t), "step": t, "avg_steps": float(t)}
        row.update(_summary(scores.loss[t - 1], scores.correct[t - 1]))
        row["flops_per_token"] = flops_per_token(config, seq_len, t)
        row["extrapolated"] = t > trained
        table.append(row)

    def exit_rows(kind: str, gate: str, values: tuple[float, ...], prefix: str, source: TokenScores) -> None:
        for index, value in enumerate(values):
            exit_steps = source.exit_steps[f"{prefix}={value}"]
            average = float(exit_steps.double().mean())
            row = {"kind": kind, "gate": gate, "threshold": float(value), "step": index, "avg_steps": average}
            row.update(_summary(*_at_exit(source, exit_steps)))
            row["flops_per_token"] = flops_per_token(config, seq_len, average)
            counts = torch.bincount(exit_steps, minlength=trained + 1)[1:]
            row.update({f"exit_frac_t{t}": float(c) / exit_steps.numel() for t, c in enumerate(counts.tolist(), 1)})
            table.append(row)

    exit_rows("qexit", "model", exits.q_thresholds, "q", scores)
    exit_rows("hdiff", "model", epsilons, "hdiff", scores)
    if stage1_model is not None:
        q_policies: dict[str, ExitPolicy] = {f"q={q}": QExit(q) for q in exits.q_thresholds}
        stage1_scores = score_tokens(stage1_model, rows, max_steps=trained, policies=q_policies, batch_size=batch_size)
        exit_rows("qexit", "stage1", exits.q_thresholds, "q", stage1_scores)
    return table


# ---------------------------------------------------------------- lm-eval


def lm_eval_rows(model: LoopLM, tokenizer: Any, settings: LmEvalSettings) -> list[dict[str, Any]]:
    """Task scores through lm-evaluation-harness at each requested recurrent step."""
    if not settings.tasks:
        return []
    from looplm.pipelines.lm_eval_adapter import run_tasks

    table = []
    for steps in settings.steps or (model.config.total_ut_steps,):
        results = run_tasks(
            model,
            settings.tasks,
            tokenizer=tokenizer,
            num_steps=steps,
            exit_threshold=settings.exit_threshold,
            limit=settings.limit,
            batch_size=settings.batch_size,
            task_paths=settings.task_paths,
        )
        for task, metrics in sorted(results["results"].items()):
            for name, value in sorted(metrics.items()):
                is_score = "stderr" not in name and not name.startswith("sample_len")
                if isinstance(value, int | float) and not isinstance(value, bool) and is_score:
                    metric = name.split(",")[0]
                    table.append({"kind": "lm_eval", "task": task, "metric": metric, "step": steps, "value": value})
    return table


# ---------------------------------------------------------------- plots and the table


def plot_loss_by_step(table: list[dict[str, Any]], trained_steps: int):
    plt = pyplot()
    rows = [r for r in table if r["kind"] == "step"]
    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(steps, [r["loss"] for r in rows], marker="o")
    ax_acc.plot(steps, [r["acc"] for r in rows], marker="o", color="tab:green")
    for ax, label in ((ax_loss, "validation loss (nats/token)"), (ax_acc, "next-token accuracy")):
        ax.axvline(trained_steps, color="grey", linestyle="--", linewidth=1, label=f"trained T = {trained_steps}")
        ax.set_xlabel("recurrent step t")
        ax.set_ylabel(label)
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Quality by recurrent step (steps past T are extrapolation)")
    fig.tight_layout()
    return fig


def plot_compute_quality(table: list[dict[str, Any]], trained_steps: int):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [
        ("static exit (step t)", [r for r in table if r["kind"] == "step" and r["step"] <= trained_steps], "s-"),
        ("Q-exit, model's gate", [r for r in table if r["kind"] == "qexit" and r["gate"] == "model"], "o-"),
        ("Q-exit, Stage I gate", [r for r in table if r["kind"] == "qexit" and r["gate"] == "stage1"], "^--"),
        ("hidden-state difference", [r for r in table if r["kind"] == "hdiff"], "d:"),
    ]
    step_rows = [r for r in table if r["kind"] == "step"]
    to_flops = None
    if len(step_rows) >= 2:
        a, b = step_rows[0], step_rows[1]
        slope = (b["flops_per_token"] - a["flops_per_token"]) / (b["avg_steps"] - a["avg_steps"]) / 1e6
        offset = a["flops_per_token"] / 1e6 - slope * a["avg_steps"]
        to_flops = (lambda s: offset + slope * s, lambda f: (f - offset) / slope)
    for ax, metric, label in ((axes[0], "loss", "loss at exit (nats/token)"), (axes[1], "acc", "accuracy at exit")):
        for name, rows, style in series:
            if rows:
                rows = sorted(rows, key=lambda r: r["avg_steps"])
                ax.plot([r["avg_steps"] for r in rows], [r[metric] for r in rows], style, label=name, markersize=4)
        ax.set_xlabel("average recurrent steps per token")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if to_flops is not None:  # FLOPs are linear in the steps: label the same axis in compute
            ax.secondary_xaxis("top", functions=to_flops).set_xlabel("forward MFLOPs per token")
    axes[0].legend(fontsize=8)
    fig.suptitle("Compute-quality trade-off of early exit")
    fig.tight_layout()
    return fig


def plot_exit_histogram(table: list[dict[str, Any]], trained_steps: int, thresholds: tuple[float, ...]):
    plt = pyplot()
    q_rows = {r["threshold"]: r for r in table if r["kind"] == "qexit" and r["gate"] == "model"}
    chosen = [(f"Q-exit q={q:g}", q_rows[q]) for q in thresholds if q in q_rows]
    hdiff = [r for r in table if r["kind"] == "hdiff"]
    if hdiff:
        middle = hdiff[len(hdiff) // 2]
        chosen.append((f"hidden diff eps={middle['threshold']:.3g}", middle))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(chosen))
    for i, (name, row) in enumerate(chosen):
        fractions = [row.get(f"exit_frac_t{t}", 0.0) for t in range(1, trained_steps + 1)]
        positions = [t + (i - (len(chosen) - 1) / 2) * width for t in range(1, trained_steps + 1)]
        ax.bar(positions, fractions, width=width, label=f"{name} (avg {row['avg_steps']:.2f})")
    ax.set_xticks(range(1, trained_steps + 1))
    ax.set_xlabel("exit step")
    ax.set_ylabel("fraction of tokens")
    ax.set_title("Where tokens exit")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def table_csv(table: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in table:
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(table)
    return buffer.getvalue()


# ---------------------------------------------------------------- logging


def _metric_name(text: str) -> str:
    return re.sub(r"[^\w.\-/ ]", "_", text)


def log_report(run: RunLogger, table: list[dict[str, Any]], trained_steps: int, exits: ExitGrid) -> None:
    """Metrics (per step, per threshold), the three plots and the table, into `run`."""
    for row in table:
        if row["kind"] == "step":
            metrics = {"val_loss_by_step": row["loss"], "val_ppl_by_step": row["ppl"], "val_acc_by_step": row["acc"]}
            run.log_metrics(metrics, step=row["step"])
            run.log_metrics(by_step_metrics(metrics, row["step"]))  # what the compare page lines up across runs
            if row["step"] == trained_steps:
                run.log_metrics({"val_loss": row["loss"], "val_ppl": row["ppl"], "val_acc": row["acc"]})
        elif row["kind"] in ("qexit", "hdiff"):
            prefix = row["kind"] if row["gate"] == "model" else f"{row['gate']}_{row['kind']}"
            step = round(100 * row["threshold"]) if row["kind"] == "qexit" else row["step"]
            metrics = {f"{prefix}_{key}": row[key] for key in ("avg_steps", "loss", "acc", "flops_per_token")}
            run.log_metrics(metrics, step=step)
        elif row["kind"] == "lm_eval":
            metrics = {_metric_name(f"lm_eval/{row['task']}/{row['metric']}"): row["value"]}
            run.log_metrics(metrics, step=row["step"])
            run.log_metrics(by_step_metrics(metrics, row["step"]))
        elif row["kind"] == "reasoning":
            metrics = {f"exact_match_{row['task']}_by_step": row["exact_match"]}
            run.log_metrics(metrics, step=row["step"])
            run.log_metrics(by_step_metrics(metrics, row["step"]))
    step_rows = [r for r in table if r["kind"] == "step"]
    if step_rows:
        best = min(step_rows, key=lambda r: r["loss"])
        run.log_metrics({"best_step_by_loss": best["step"]})
        run.log_figure(plot_loss_by_step(table, trained_steps), "plots/loss_by_step.png")
    if any(r["kind"] in ("qexit", "hdiff") for r in table):
        run.log_figure(plot_compute_quality(table, trained_steps), "plots/compute_quality.png")
        run.log_figure(
            plot_exit_histogram(table, trained_steps, exits.histogram_thresholds), "plots/exit_histogram.png"
        )
    run.log_text(table_csv(table), "eval_table.csv")
    run.log_dict(table, "eval_table.json")
    pyplot().close("all")
    run.flush()


# ---------------------------------------------------------------- the step


def run(config: EvalConfig, tracker: RunLogger | None = None, output: str | Path | None = None) -> list[dict[str, Any]]:
    """Evaluate config.model (and config.stage1_model); log to `tracker` and write the table to `output`."""
    folder = resolve_model_dir(config.model)
    model = load_pretrained(folder)
    tokenizer = load_tokenizer(folder)
    stage1 = load_pretrained(resolve_model_dir(config.stage1_model)) if config.stage1_model else None
    rows = eval_rows(config.data, tokenizer, model.config.eos_token_id)
    started = time.perf_counter()
    table = evaluate_model(
        model, rows, max_steps=config.max_steps, exits=config.exits, batch_size=config.batch_size, stage1_model=stage1
    )
    table += lm_eval_rows(model, tokenizer, config.lm_eval)
    table += reasoning_rows(model, tokenizer, config.reasoning, config.max_steps or 2 * model.config.total_ut_steps)
    trained = model.config.total_ut_steps
    if tracker is not None:
        tracker.set_tags({"looplm.model": config.model, "looplm.eval_tokens": str(rows[:, 1:].numel())})
        log_report(tracker, table, trained, config.exits)
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_table.csv").write_text(table_csv(table))
        (out / "eval_table.json").write_text(json.dumps(table, indent=2) + "\n")
    for row in table:
        if row["kind"] == "step":
            mark = " (extrapolated)" if row["extrapolated"] else ""
            print(f"  step {row['step']}: loss {row['loss']:.4f}  ppl {row['ppl']:.2f}  acc {row['acc']:.3f}{mark}")
    for row in table:
        if row["kind"] == "qexit":
            print(
                f"  {row['gate']} gate q={row['threshold']:.2f}: avg steps {row['avg_steps']:.2f}  "
                f"loss {row['loss']:.4f}  acc {row['acc']:.3f}"
            )
    for row in table:
        if row["kind"] == "reasoning":
            print(f"  {row['task']} exact match at step {row['step']}: {row['exact_match']:.3f}")
    print(f"evaluated {rows.shape[0]} x {rows.shape[1] - 1} tokens in {time.perf_counter() - started:.1f} s")
    return table


def check_inputs(config: EvalConfig) -> None:
    """Raise, naming the input, if a model, its tokenizer or the data file `run` needs is missing or malformed."""
    for location in filter(None, (config.model, config.stage1_model)):
        read_config_json(resolve_model_dir(location))
    folder = resolve_model_dir(config.model)
    try:
        load_tokenizer(folder)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 (the tokenizers library raises a bare Exception naming no file)
        raise ValueError(f"{folder / 'tokenizer.json'} cannot be read as a tokenizer: {err}") from None
    if config.data.path is not None:
        eval_texts(config.data)


def run_from_args(args: argparse.Namespace) -> int:
    """`looplm eval CONFIG [k=v ...] [--output DIR]`: log to MLFLOW_TRACKING_URI, or to a server started on the
    default store (runs/mlflow, the one `looplm mlflow` serves) for the duration of the evaluation.

    A user error (the config, a model, the data, the tracking URI) is one line on stderr and exit code 2, before
    any run exists; `--debug` (when the CLI passes it) shows its traceback. Anything else is a bug: traceback."""
    from looplm.infra.configs import ConfigFileError
    from looplm.infra.mlflow_server import MlflowServerError, ensure_tracking_server
    from looplm.infra.registry import ModelNotFoundError
    from looplm.model.checkpoint import CheckpointError

    try:
        config = load_config(EvalConfig, args.config, args.overrides)
        tracking_uri, server = ensure_tracking_server()
    except (ConfigFileError, MlflowServerError) as err:
        return _user_error(err, args)
    try:
        # Before any run exists: an attempt that fails here leaves no FAILED run behind.
        check_inputs(config)
    except (CheckpointError, ModelNotFoundError, FileNotFoundError, ValueError) as err:
        if server is not None:
            server.stop()
        return _user_error(err, args)
    return _tracked_run(config, args, tracking_uri, server)


def _user_error(err: Exception, args: argparse.Namespace) -> int:
    if getattr(args, "debug", False):
        raise err
    print(f"looplm eval: {err}", file=sys.stderr)
    return 2


def _tracked_run(config: EvalConfig, args: argparse.Namespace, tracking_uri: str, server: Any) -> int:
    from looplm.infra.tracking import pipeline_run, step_run

    try:
        print(f"tracking to {tracking_uri}")
        with pipeline_run(config.run_name, config=config, experiment=config.experiment, tracking_uri=tracking_uri) as p:
            with step_run(p, "evaluate", config=config) as step:
                run(config, step, args.output)
            print(f"run {p.run_id} in experiment {config.experiment!r}")
    finally:
        if server is not None:
            server.stop()
            print("the runs are in runs/mlflow: `looplm mlflow` serves them")
    return 0


__all__ = [
    "EvalConfig",
    "EvalData",
    "ExitGrid",
    "LmEvalSettings",
    "check_inputs",
    "eval_texts",
    "evaluate_model",
    "log_report",
    "run",
    "run_from_args",
    "score_tokens",
]
