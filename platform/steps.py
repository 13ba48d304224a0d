"""The pipeline's step kinds: each a function `(config, inputs, context) -> record` the executor runs as a Ray task.

    curate    CurateConfig     Ray Data curation, tokenizer, packing          -> CuratedData
    pretrain  PretrainConfig   megatron-core on Ray Train (Stage I or II)     -> TrainedModel   inputs: data, init
    upcycle   UpcycleConfig    duplicate a checkpoint's layers (1.4B -> 2.6B) -> UpcycledModel  inputs: model
    evaluate  EvalConfig       per-step metrics, exit curves, plots           -> EvalMetrics    inputs: model, stage1,
                                                                                                    data
    register  RegisterConfig   the model in the MLflow registry               -> RegisteredModel inputs: model, metrics
    deploy    DeployConfig     the model on Ray Serve, OpenAI-compatible      -> Endpoint       inputs: model
    study_train   StudyTrainConfig  a study's models x seeds on multi-hop QA  -> StudyRunResult  (one step each)
    study_report  StudyReportConfig mean/spread over seeds, gap CIs, plots    -> StudyReport     inputs: runs

Inputs by role: a step's config names its inputs by placeholder (`data.manifest: "@curate"`, `train.init_from_hf:
"@pretrain"`, `model: "@gate"`), which `KINDS[kind].fill` writes from the experiment's `inputs:` so that the hash
covers the upstream step (through its hash), never a machine's path; at run time the step replaces the
placeholder with the upstream folder. The steps that only orchestrate Ray work (curate on Ray Data; pretrain:
Ray Train) take no CPU themselves (num_cpus=0), or their own workers could never be scheduled on a small node;
curate with `executor: local` runs its pool inside its task, so that task reserves the pool's CPUs.

A kind with `expand` is a matrix: one YAML step becomes several executor steps (`study_train` -> one per model
and seed, named `<step>.<model>.s<seed>`), each hashed and cached on its own, so adding a seed or a model trains
only what is new. A later step names the matrix as one input; a role in the kind's `many` then receives every
member (as `<role>/<member step>`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from looplm.pipelines.curate import CurateConfig
from looplm.pipelines.evaluate import EvalConfig
from looplm.pipelines.studies import MultiHopData, StudyEval, StudyRun
from looplm.pipelines.training.config import PretrainConfig

from .records import (
    CuratedData,
    Endpoint,
    EvalMetrics,
    RegisteredModel,
    StudyReport,
    StudyRunResult,
    TrainedModel,
    UpcycledModel,
)

PLACEHOLDER = "@"  # "@<step>": filled with that step's output at run time


@dataclass(frozen=True)
class RegisterConfig:
    name: str = "looplm"  # the registered model's name
    alias: str | None = None  # e.g. "champion": set on the new version
    description: str | None = None


@dataclass(frozen=True)
class DeployConfig:
    name: str = "looplm"  # the model name clients ask for
    host: str = "127.0.0.1"  # loopback unless a deployment says otherwise
    port: int = 8000
    kv_cache: str = "per_step"  # shared caches (last_step, average) are a deliberate choice: see serving/
    max_batch_size: int = 32
    num_cpus: float = 1.0  # what the replica reserves


@dataclass(frozen=True)
class UpcycleConfig:
    factor: int = 2
    order: str = "stacked"  # stacked: [1..N, 1..N]; interleaved: [1, 1, 2, 2, ...]


# ---------------------------------------------------------------- curate


@contextlib.contextmanager
def _without_env(name: str) -> Iterator[None]:
    """Hide one environment variable for a block (curate would open its own top-level MLflow run from it)."""
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


def curate_step(config: CurateConfig, inputs: dict, context: Any) -> CuratedData:
    from looplm.pipelines.curate import curate, print_summary
    from looplm.pipelines.curation.report import report_metrics

    folder = context.output / "curated"
    config = dataclasses.replace(config, mlflow_tracking_uri=None)
    with _without_env("MLFLOW_TRACKING_URI"):  # the step's nested run below records it instead
        report = curate(config, folder)
    print_summary(report)
    manifest = json.loads((folder / "mixture.json").read_text())
    datasets = {
        name: {
            "weight": entry["weight"],
            **{
                f"{split}_{what}": entry[split][what]
                for split in ("train", "valid")
                for what in ("tokens", "documents")
            },
        }
        for name, entry in manifest["sources"].items()
    }
    if context.tracker is not None:
        context.tracker.log_metrics(report_metrics(report))
        for path in sorted((folder / "report").iterdir()):
            context.tracker.log_artifact(path, "curation_report")
    return CuratedData(
        folder="curated",
        manifest="curated/mixture.json",
        tokenizer="curated/tokenizer.json",
        vocab_size=manifest["vocab_size"],
        eod_id=manifest["eod_id"],
        datasets=datasets,
        documents_kept=report["documents_kept"],
        documents_removed=report["documents_read"] - report["documents_kept"],
    )


# ---------------------------------------------------------------- pretrain


class TrainingProgress:
    """A live line per logged interval: step of total, rate, ETA and the loss."""

    def __init__(self, name: str, total: int):
        self.name, self.total, self.started, self.first = name, total, time.perf_counter(), None

    def __call__(self, record: dict[str, Any]) -> None:
        now = time.perf_counter()
        step = int(record["step"])
        if "loss" not in record:
            print(f"[{self.name}] step {step}/{self.total}  validation loss {record['valid_loss']:.4f}", flush=True)
            return
        if self.first is None:  # a resumed run starts mid-way: the rate counts from the first step seen here
            self.first = (step, now)
        done, elapsed = step - self.first[0], now - self.first[1]
        rate = done / elapsed if done and elapsed > 0 else 0.0
        eta = f"{(self.total - step) / rate:.0f}s" if rate else "?"
        print(
            f"[{self.name}] step {step}/{self.total} ({100 * step / self.total:.0f}%)  {rate:.2f} steps/s  "
            f"ETA {eta}  loss {record['loss']:.4f}  tok/s {record.get('tokens_per_s', 0):.0f}",
            flush=True,
        )


def resolve_pretrain_inputs(config: PretrainConfig, inputs: dict) -> PretrainConfig:
    """The config with the data and init placeholders replaced by the upstream folders."""
    data, train = config.data, config.train
    if "data" in inputs:
        upstream = inputs["data"]
        data = dataclasses.replace(data, manifest=str(upstream.path(upstream.record.folder)), paths=(), generator=None)
    if "init" in inputs:
        upstream = inputs["init"]
        train = dataclasses.replace(train, init_from_hf=str(upstream.path(upstream.record.hf)))
    return config.replace(data=data, train=train)


def pretrain_step(config: PretrainConfig, inputs: dict, context: Any) -> TrainedModel:
    from looplm.pipelines.pretrain import launch, save_training_plot
    from looplm.pipelines.training.trainer import HF_EXPORT, RUN_INFO

    config = resolve_pretrain_inputs(config, inputs)
    # Ray Train's workers resume from <output>/checkpoints/latest: a rerun of a killed step continues there.
    result = launch(config, context.output, on_record=TrainingProgress(context.name, config.train.steps))
    if result.checkpoint is None:
        raise RuntimeError(f"{context.name}: training finished without a checkpoint under {context.output}")
    training = [r for r in result.records if "loss" in r]
    valid = [r["valid_loss"] for r in result.records if "valid_loss" in r]
    if context.tracker is not None:
        info = context.output / RUN_INFO
        if info.is_file():
            context.tracker.set_tags({f"looplm.{k}": str(v) for k, v in json.loads(info.read_text()).items()})
        for record in result.records:
            metrics = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, int | float)}
            context.tracker.log_metrics(metrics, step=int(record["step"]))
        plot = save_training_plot(result.records, context.output / "training.png")
        if plot is not None:
            context.tracker.log_artifact(plot, "plots")
    return TrainedModel(
        checkpoint=str(result.checkpoint.relative_to(context.output.resolve())),
        hf=HF_EXPORT,
        steps=config.train.steps,
        objective=config.train.objective,
        final_loss=float(training[-1]["loss"]) if training else float("nan"),
        valid_loss=float(valid[-1]) if valid else None,
    )


# ---------------------------------------------------------------- upcycle


def upcycle_step(config: UpcycleConfig, inputs: dict, context: Any) -> UpcycledModel:
    from looplm.model.checkpoint import read_config_json
    from looplm.model.upcycle import upcycle_layers

    upstream = inputs["model"]
    target = context.output / "hf"
    if target.exists():  # an interrupted earlier attempt: upcycling writes a new folder
        import shutil

        shutil.rmtree(target)
    upcycle_layers(upstream.path(upstream.record.hf), target, factor=config.factor, order=config.order)
    return UpcycledModel(hf="hf", num_hidden_layers=int(read_config_json(target)["num_hidden_layers"]))


# ---------------------------------------------------------------- evaluate


def held_out_text(curated: Any, target: Path, limit: int) -> Path:
    """The curated valid split as text (.jsonl), decoded from its token files: what the model never trained on,
    drawn from the same sources (byte-level BPE decodes exactly)."""
    from looplm.model.tokenizer import load_tokenizer
    from looplm.pipelines.curation.pack import open_indexed
    from looplm.pipelines.training.data import read_manifest

    manifest = read_manifest(curated.path(curated.record.folder))
    tokenizer = load_tokenizer(manifest.tokenizer)
    lines = []
    for prefix in manifest.valid[0]:
        documents = open_indexed(prefix)
        for index in range(len(documents)):  # by index: megatron's dataset has no end for plain iteration
            ids = [int(t) for t in documents[index] if int(t) != manifest.eod_id]
            lines.append(json.dumps({"text": tokenizer.decode(ids)}))
            if len(lines) >= limit:
                break
    if not lines:
        raise ValueError(f"{manifest.folder}: the valid split is empty; set evaluate's data.path instead")
    target.write_text("\n".join(lines) + "\n")
    return target


def evaluate_step(config: EvalConfig, inputs: dict, context: Any) -> EvalMetrics:
    from looplm.pipelines.evaluate import run

    model = inputs["model"]
    stage1 = inputs.get("stage1")
    data = config.data
    if "data" in inputs and data.path is None:  # held-out curated text, unless the config names its own
        data = dataclasses.replace(data, path=str(held_out_text(inputs["data"], context.output / "valid.jsonl", 2000)))
    config = dataclasses.replace(
        config,
        model=str(model.path(model.record.hf)),
        stage1_model=str(stage1.path(stage1.record.hf)) if stage1 is not None else None,
        data=data,
    )
    table = run(config, context.tracker, output=context.output)
    trained = json.loads((model.path(model.record.hf) / "config.json").read_text())["total_ut_steps"]
    metrics: dict[str, float] = {}
    for row in table:
        if row["kind"] == "step":
            metrics[f"loss_step_{row['step']}"] = float(row["loss"])
            if row["step"] == trained:
                metrics.update(val_loss=float(row["loss"]), val_ppl=float(row["ppl"]), val_acc=float(row["acc"]))
    return EvalMetrics(metrics=metrics, table="eval_table.json", trained_steps=int(trained))


# ---------------------------------------------------------------- register


def register_step(config: RegisterConfig, inputs: dict, context: Any) -> RegisteredModel:
    from looplm.pipelines.register import register_model

    if context.tracker is None:
        raise RuntimeError(
            "register needs an MLflow tracking server: set MLFLOW_TRACKING_URI (`looplm mlflow` starts one)"
        )
    model = inputs["model"]
    metrics = inputs["metrics"].record.metrics if "metrics" in inputs else {}
    headline = {k: v for k, v in metrics.items() if k in ("val_loss", "val_ppl", "val_acc")}
    version = register_model(
        model.path(model.record.hf),
        config.name,
        run=context.tracker,
        metrics=headline,
        alias=config.alias,
        description=config.description,
    )
    uri = f"models:/{config.name}/{version.version}"
    print(f"[{context.name}] registered {uri}", flush=True)
    return RegisteredModel(model_uri=uri, name=config.name, version=int(version.version), alias=config.alias)


# ---------------------------------------------------------------- deploy


def deploy_step(config: DeployConfig, inputs: dict, context: Any) -> Endpoint:
    """Serve the model on the connected Ray cluster: a registered model by its URI (the replica downloads it from
    the tracking server), any other model record by its HF folder. Returns once the endpoint answers."""
    from looplm.serving import EngineConfig, ServeConfig, deploy

    upstream = inputs["model"]
    served = getattr(upstream.record, "model_uri", None) or str(upstream.path(upstream.record.hf))
    serve_config = ServeConfig(
        engine=EngineConfig(kv_cache=config.kv_cache, max_batch_size=config.max_batch_size),
        num_cpus=config.num_cpus,
        tracking_uri=context.tracker.tracking_uri if context.tracker is not None else None,
    )
    base_url = deploy(served, name=config.name, host=config.host, port=config.port, config=serve_config)
    print(f"[{context.name}] {served} answers at {base_url} as model {config.name!r}", flush=True)
    if context.tracker is not None:
        context.tracker.set_tags({"looplm.endpoint": base_url, "looplm.served": served})
    return Endpoint(base_url=base_url, model=config.name, served=served, kv_cache=config.kv_cache)


# ---------------------------------------------------------------- studies (docs/studies.md)


@dataclass(frozen=True)
class StudyModel:
    """One model of a study: its sections are merged over the study's shared ones, field by field."""

    model: dict[str, Any] = field(default_factory=dict)  # LoopLMConfig fields
    training: dict[str, Any] = field(default_factory=dict)  # TrainSettings fields
    stage2: dict[str, Any] | None = None  # TrainSettings of a Stage II gate run (early-exit curves); None: none
    eval: dict[str, Any] = field(default_factory=dict)  # StudyEval fields (e.g. kv_prompts for this model only)


@dataclass(frozen=True)
class StudyTrainConfig:
    data: MultiHopData = field(default_factory=MultiHopData)
    model: dict[str, Any] = field(default_factory=dict)  # shared LoopLMConfig fields
    training: dict[str, Any] = field(default_factory=dict)  # shared TrainSettings fields
    eval: StudyEval = field(default_factory=StudyEval)
    seeds: tuple[int, ...] = (0, 1, 2)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> StudyModel fields


@dataclass(frozen=True)
class StudyReportConfig:
    gaps: tuple[tuple[str, str], ...] = ()  # (a, b): exact match of a minus b at their trained T, with a CI
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must lie in (0, 1), got {self.confidence}")


def expand_study(config: StudyTrainConfig, where: str) -> list[tuple[str, StudyRun]]:
    """The study's runs, one per model and seed: (suffix "<model>.s<seed>", its StudyRun). Every model and
    training section is built here once, so a field the model or trainer does not know fails at load time."""
    from looplm.infra.configs import ConfigFileError, build_config, to_dict
    from looplm.pipelines.studies import StudyConfigError, check_run

    if not config.models:
        raise ConfigFileError(f"{where}.models: a study needs at least one model")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ConfigFileError(f"{where}.seeds: give one or more distinct seeds, got {list(config.seeds)}")
    runs = []
    for name, entry in config.models.items():
        at = f"{where}.models.{name}"
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigFileError(f"{at}: a model name is letters, digits, _ and -")
        spec = build_config(StudyModel, entry or {}, at)
        settings = build_config(StudyEval, {**to_dict(config.eval), **spec.eval}, f"{at}.eval")
        for seed in config.seeds:
            run = StudyRun(
                name=name,
                seed=seed,
                data=config.data,
                model={**config.model, **spec.model},
                training={**config.training, **spec.training},
                stage2=spec.stage2,
                eval=settings,
            )
            try:
                check_run(run, at)
            except StudyConfigError as err:
                raise ConfigFileError(str(err)) from None
            runs.append((f"{name}.s{seed}", run))
    return runs


def study_train_step(config: StudyRun, inputs: dict, context: Any) -> StudyRunResult:
    from looplm.infra.tracking import by_step_metrics
    from looplm.pipelines.studies import train_and_measure

    tracker = context.tracker
    total = int(config.training.get("steps", 0)) or None

    def log(record: dict[str, Any]) -> None:
        gate = record.get("stage") == 2
        if not gate and (record["step"] % max(1, 10 * int(config.training.get("log_every", 10))) == 0):
            context.progress(f"step {record['step']}/{total}  loss {record['loss']:.4f}")
        if tracker is not None:
            prefix = "gate_" if gate else ""
            metrics = {f"{prefix}{k}": float(v) for k, v in record.items() if k not in ("step", "stage")}
            tracker.log_metrics(metrics, step=int(record["step"]))

    if tracker is not None:
        tracker.set_tags({"looplm.study.model": config.name, "looplm.study.seed": str(config.seed)})
    result = train_and_measure(config, context.output, log)
    record = StudyRunResult(
        model=config.name,
        seed=config.seed,
        hf="hf",
        num_layers=result.num_layers,
        total_ut_steps=result.total_ut_steps,
        parameters=result.parameters,
        flops_by_pass=result.flops_by_pass,
        exact_match=result.exact_match,
        train_exact_match=result.train_exact_match,
        val_loss=result.val_loss,
        exit_curves=result.exit_curves,
        kv=result.kv,
        final_loss=result.final_loss,
        train_seconds=result.train_seconds,
    )
    trained = result.total_ut_steps
    context.progress(
        f"{config.name} seed {config.seed}: exact match {result.exact_match[trained - 1]:.3f} at T = {trained} "
        f"(by pass: {', '.join(f'{v:.2f}' for v in result.exact_match)}), {result.train_seconds:.0f} s training"
    )
    if tracker is not None:
        for t in range(1, len(result.exact_match) + 1):
            metrics = {"exact_match": result.exact_match[t - 1], "val_loss": result.val_loss[t - 1]}
            if result.train_exact_match:
                metrics["train_exact_match"] = result.train_exact_match[t - 1]
            tracker.log_metrics({f"{k}_by_pass": v for k, v in metrics.items()}, step=t)
            tracker.log_metrics(by_step_metrics(metrics, t))
        tracker.log_metrics(
            {"exact_match": result.exact_match[trained - 1], "val_loss": result.val_loss[trained - 1],
             "parameters": result.parameters, "train_seconds": result.train_seconds}
        )  # fmt: skip
        for index, point in enumerate(result.exit_curves):
            name = f"exit_{point['policy']}" + (f"_{point['gate']}" if point["gate"] else "")
            tracker.log_metrics(
                {f"{name}/avg_steps": point["avg_steps"], f"{name}/exact_match": point["exact_match"]}, step=index
            )
        for strategy, values in result.kv.items():
            tracker.log_metrics({f"kv_{strategy}/{key}": value for key, value in values.items()})
    (context.output / "result.json").write_text(json.dumps(dataclasses.asdict(record), indent=2) + "\n")
    return record


def study_report_step(config: StudyReportConfig, inputs: dict, context: Any) -> StudyReport:
    from looplm.pipelines import study_report

    runs = [dataclasses.asdict(up.record) for _, up in sorted(inputs.items())]
    if not runs:
        raise ValueError(f"{context.name}: no study runs to report on (inputs: runs)")
    models = study_report.aggregate(runs)
    gaps = study_report.gaps(runs, [tuple(pair) for pair in config.gaps], config.confidence)
    summary = study_report.markdown(models, gaps, config.confidence)
    (context.output / "study.md").write_text(summary)
    (context.output / "study.json").write_text(json.dumps({"models": models, "gaps": gaps}, indent=2) + "\n")
    plots = study_report.write_plots(models, context.output)
    print(summary, flush=True)
    if context.tracker is not None:
        tracker = context.tracker
        for name, entry in models.items():
            for t, mean in enumerate(entry["exact_match"]["mean"], 1):
                tracker.log_metrics({f"{name}/exact_match_mean": mean}, step=t)
                tracker.log_metrics({f"{name}/exact_match_mean/t{t:02d}": mean})
            tracker.log_metrics({f"{name}/exact_match_at_T": entry["at_trained"]["mean"]})
        for key, gap in gaps.items():
            tracker.log_metrics({f"gap/{key}/{k}": v for k, v in gap.items() if k in ("gap", "low", "high")})
        for path in plots:
            tracker.log_artifact(path, "plots")
        tracker.log_artifact(context.output / "study.md")
        tracker.log_artifact(context.output / "study.json")
    return StudyReport(summary="study.md", table="study.json", plots=[p.name for p in plots], gaps=gaps)


# ---------------------------------------------------------------- the table of kinds


@dataclass(frozen=True)
class Kind:
    config: type
    fn: Callable[..., Any]
    roles: tuple[str, ...]  # the inputs it takes
    required: tuple[str, ...] = ()
    num_cpus: float | Callable[[Any], float] = 1.0  # or (config) -> the CPUs its task reserves
    cacheable: bool = True  # False: runs every time (a deploy step: its endpoint lives only while served)
    # (config as plain data, {role: upstream step name}) -> the data with each input's placeholder written in
    fill: Callable[[dict[str, Any], dict[str, str]], dict[str, Any]] = field(default=lambda data, inputs: data)
    # (config, where) -> [(suffix, per-step config)]: one YAML step becomes one executor step per entry (a matrix)
    expand: Callable[[Any, str], list[tuple[str, Any]]] | None = None
    many: tuple[str, ...] = ()  # roles that take a whole matrix (every member step) as inputs


def _fill_pretrain(data: dict[str, Any], inputs: dict[str, str]) -> dict[str, Any]:
    data = {**data}
    if "data" in inputs:
        section = {k: v for k, v in (data.get("data") or {}).items() if k not in ("paths", "weights", "generator")}
        data["data"] = {**section, "manifest": PLACEHOLDER + inputs["data"]}
    if "init" in inputs:
        data["train"] = {**(data.get("train") or {}), "init_from_hf": PLACEHOLDER + inputs["init"]}
    return data


def _fill_evaluate(data: dict[str, Any], inputs: dict[str, str]) -> dict[str, Any]:
    data = {**data, "model": PLACEHOLDER + inputs["model"]}
    if "stage1" in inputs:
        data["stage1_model"] = PLACEHOLDER + inputs["stage1"]
    return data


def _curate_cpus(config: CurateConfig) -> float:
    """On Ray Data the work runs in Ray Data's own tasks; the local executor's pool runs inside the step's task,
    so the task reserves the pool's CPUs (all of this machine's when num_cpus is unset)."""
    if config.executor == "ray":
        return 0
    from looplm.pipelines.curation.local import cpu_count  # pandas: only for a local curate step

    return config.num_cpus or cpu_count()


KINDS: dict[str, Kind] = {
    "curate": Kind(CurateConfig, curate_step, roles=(), num_cpus=_curate_cpus),
    "pretrain": Kind(PretrainConfig, pretrain_step, roles=("data", "init"), num_cpus=0, fill=_fill_pretrain),
    "upcycle": Kind(UpcycleConfig, upcycle_step, roles=("model",), required=("model",)),
    "evaluate": Kind(
        EvalConfig, evaluate_step, roles=("model", "stage1", "data"), required=("model",), fill=_fill_evaluate
    ),
    "register": Kind(RegisterConfig, register_step, roles=("model", "metrics"), required=("model",), num_cpus=0),
    # A live endpoint is not files: deploy runs every time (its upstream steps stay cached).
    "deploy": Kind(DeployConfig, deploy_step, roles=("model",), required=("model",), num_cpus=0, cacheable=False),
    # A study matrix: one step per model and seed (each cached on its own), then the aggregate over them.
    "study_train": Kind(StudyTrainConfig, study_train_step, roles=(), expand=expand_study),
    "study_report": Kind(StudyReportConfig, study_report_step, roles=("runs",), required=("runs",), many=("runs",)),
}
