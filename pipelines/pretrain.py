"""The pretrain step: a PretrainConfig trained on megatron-core, launched as a Ray Train job.

    looplm train configs/train-tiny-cpu.yaml train.steps=50 --output runs/tiny

`launch` starts a TorchTrainer with one worker per rank (TP x PP x DP; gloo on CPU, NCCL on GPU). Each worker
applies megatron's CPU patches where it starts (`cpu_shim.apply`, a no-op with CUDA) and runs
`training.trainer.train_on_rank`, which resumes from `<output>/checkpoints/latest` when it exists, so the
FailureConfig's restarts, and a rerun of the same command, continue from the last complete checkpoint. Restarts
are counted from what Ray Train reports: a controller callback records every worker-group failure to
`<output>/worker_failures.jsonl`. Before the workers start, the driver checks the checkpoint they will resume
from (`checkpoints.resume_point`): a damaged latest one falls back to the previous readable one, and none readable
stops the launch (a CheckpointError, not a retry). On one node the process group listens on loopback only
(`training.process_group`).
Workers report to Ray Train once per log interval (per-step reports are throttled to one per ~2 s); rank 0
also appends each record to `<output>/metrics.jsonl`. Metrics reach MLflow once per job, from the driver after
the job, never from a rank.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from looplm.infra.configs import load_config, to_dict

from .training.config import PretrainConfig

METRICS_FILE = "metrics.jsonl"
FAILURES_FILE = "worker_failures.jsonl"
TRAINING_PLOT = "training.png"


@dataclass
class PretrainResult:
    output: Path
    records: list[dict[str, Any]]  # one per logged interval (the last record of each step wins after a restart)
    checkpoint: Path | None  # the latest complete checkpoint
    restarts: int  # worker-group failures Ray Train recovered from during this launch


def _worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker = one rank; torch.distributed is already initialised by TorchTrainer."""
    import ray.train
    import torch.distributed as dist

    from looplm.model.megatron import cpu_shim

    from .training.trainer import train_on_rank

    cpu_shim.apply()  # once, where the worker process starts (a no-op with CUDA)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    config: PretrainConfig = loop_config["config"]
    output = Path(loop_config["output"])
    rank = dist.get_rank()

    def write_metrics(record: dict[str, Any]) -> None:
        if rank == 0:
            append_record(output / METRICS_FILE, record)

    def report(record: dict[str, Any]) -> None:
        ray.train.report({k: v for k, v in record.items() if isinstance(v, int | float)})

    train_on_rank(config, output, callbacks=[write_metrics, *loop_config.get("callbacks", ()), report])


def _failure_log(path: Path):
    """A Ray Train controller callback that appends each worker-group failure Ray Train reports to `path`."""
    from ray.train import UserCallback

    class FailureLog(UserCallback):
        def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
            errors = {str(rank): f"{type(err).__name__}: {err}"[:500] for rank, err in worker_exceptions.items()}
            with open(path, "a") as sink:
                sink.write(json.dumps({"ranks": sorted(worker_exceptions), "errors": errors}) + "\n")

    return FailureLog()


def _count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line. A crash can leave a last line half-written: the new record then starts on a line of
    its own, so the torn fragment stays one unreadable line instead of corrupting the record after it."""
    with open(path, "ab") as sink:
        torn = sink.tell() > 0 and _last_byte(path) != b"\n"
        sink.write((("\n" if torn else "") + json.dumps(record) + "\n").encode())


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as source:
        source.seek(-1, os.SEEK_END)
        return source.read(1)


def read_metrics(output: str | Path) -> list[dict[str, Any]]:
    """The logged records, one per step (a step logged again after a restart keeps its last record). Lines a
    crash left half-written are skipped, and said."""
    path = Path(output) / METRICS_FILE
    if not path.is_file():
        return []
    by_step: dict[tuple[int, bool], dict[str, Any]] = {}
    torn = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn.append(number)
            continue
        by_step[(record["step"], "valid_loss" in record)] = record
    if torn:
        print(
            f"{path}: skipped {len(torn)} line(s) a crash left half-written (line {', '.join(map(str, torn))})",
            file=sys.stderr,
        )
    return [by_step[key] for key in sorted(by_step)]


@contextmanager
def following(path: Path, on_record: Callable[[dict[str, Any]], None] | None) -> Iterator[None]:
    """Call on_record for each record appended to the metrics file while the block runs (live progress)."""
    if on_record is None:
        yield
        return
    done = threading.Event()
    seen = path.stat().st_size if path.exists() else 0

    def poll() -> None:
        nonlocal seen
        while True:
            finished = done.wait(0.5)
            if path.exists() and path.stat().st_size > seen:
                with open(path) as source:
                    source.seek(seen)
                    chunk = source.read()
                complete = chunk[: chunk.rfind("\n") + 1]  # a line still being written waits for the next poll
                seen += len(complete.encode())
                for line in complete.splitlines():
                    with contextlib.suppress(json.JSONDecodeError):  # a crash's torn line: read_metrics says so
                        on_record(json.loads(line))
            if finished:
                return

    thread = threading.Thread(target=poll, name="metrics-follower", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def launch(
    config: PretrainConfig,
    output: str | Path,
    *,
    ray_address: str | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    worker_callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
) -> PretrainResult:
    """Run `config` as a Ray Train job on the cluster at ray_address / $RAY_ADDRESS, or on a local Ray.

    on_record, when given, sees each logged record as the job writes it (the CLI prints them as progress).
    worker_callbacks run inside every worker with each record (train_on_rank's callbacks; they must pickle).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from looplm.infra.ray_cluster import ray_session
    from looplm.model.config import ConfigError

    from .training import checkpoints
    from .training import optimizer as optim_lib
    from .training.data import copy_tokenizer, with_manifest
    from .training.process_group import ProcessGroupConfig
    from .training.trainer import HF_EXPORT

    config = with_manifest(config)  # a curated manifest's EOD and token ids, and its vocabulary checked
    output = Path(output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(to_dict(config), indent=2, default=str) + "\n")
    on_gpu = torch.cuda.is_available()
    interface = config.launch.network_interface
    workers = config.world_size  # tensor_parallel x pipeline_parallel x data_parallel
    failures = output / FAILURES_FILE
    failures_before = _count_lines(failures)
    # Which checkpoint to resume from is settled here, once, before any worker starts: a damaged latest one
    # falls back to the previous readable one (said), and none readable is an error no restart could heal.
    resume = checkpoints.resume_point(output / "checkpoints", say=lambda line: print(line, file=sys.stderr, flush=True))
    if resume is not None:  # another optimizer's state cannot load: a config error, refused before Ray starts
        saved_with = json.loads((resume / "trainer.json").read_text()).get("optimizer", "torch-adamw")
        if saved_with != optim_lib.describe(config):
            raise ConfigError(
                f"{resume} holds {saved_with} optimizer state but this run steps with {optim_lib.describe(config)}; "
                "resume with the same optim.implementation / optim.distributed, or start a new output folder"
            )
    # Ray Train drains worker reports every 2 s by default, which throttles even per-interval reports on short
    # CPU runs (ray-mlflow-notes.md §4); 0.2 s costs nothing measurable.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    env = {"OMP_NUM_THREADS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]}
    local_cpus = None if (ray_address or os.environ.get("RAY_ADDRESS")) else max(2, workers)
    # A local Ray includes its dashboard (on 127.0.0.1): Ray Train's placement-group cleaner asks the State API,
    # which the dashboard serves, whether the controller lives; without it, it warns every second and cleans nothing.
    runtime_env = {
        "env_vars": env,
        # In every process of the job (the Train controller's included): a harmless timeout's traceback is dropped.
        "worker_process_setup_hook": "looplm.pipelines.training.ray_logging.quiet_ray_train_start",
    }
    with ray_session(ray_address, num_cpus=local_cpus, include_dashboard=True, runtime_env=runtime_env):
        trainer = TorchTrainer(
            _worker,
            train_loop_config={
                "config": config,
                "output": str(output),
                "callbacks": list(worker_callbacks),
            },
            torch_config=ProcessGroupConfig(backend="nccl" if on_gpu else "gloo", network_interface=interface),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=on_gpu, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(
                name=config.name,
                storage_path=str(output / "ray"),
                failure_config=FailureConfig(max_failures=config.launch.max_failures),
                callbacks=[_failure_log(failures)],
            ),
        )
        with following(output / METRICS_FILE, on_record):
            trainer.fit()
    copy_tokenizer(config, output / HF_EXPORT)  # the export evaluates, registers and serves as it is
    restarts = _count_lines(failures) - failures_before
    return PretrainResult(output, read_metrics(output), checkpoints.latest(output / "checkpoints"), restarts)


def plot_training(records: list[dict[str, Any]]):
    """Three panels over the optimizer step: the loss (and the final validation loss), the cross-entropy of each
    recurrent step, and the mean exit distribution stacked over the recurrent steps (T may change mid-run)."""
    from looplm.infra.tracking import pyplot

    plt = pyplot()
    logged = [r for r in records if "loss" in r]
    steps = [r["step"] for r in logged]
    depth = max((int(k.rsplit("_", 1)[1]) for r in logged for k in r if k.startswith("ce_step_")), default=0)
    fig, (ax_loss, ax_ce, ax_exit) = plt.subplots(1, 3, figsize=(15, 4))
    ax_loss.plot(steps, [r["loss"] for r in logged], label="training objective")
    for record in (r for r in records if "valid_loss" in r):
        ax_loss.plot(record["step"], record["valid_loss"], "o", color="tab:red", label="validation loss")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend()
    for t in range(1, depth + 1):
        ax_ce.plot(steps, [r.get(f"ce_step_{t}", float("nan")) for r in logged], label=f"t = {t}")
    ax_ce.set_ylabel("cross-entropy at recurrent step t")
    ax_ce.legend(ncol=2, fontsize=8)
    if logged and depth:
        shares = [[r.get(f"exit_prob_step_{t}", 0.0) for r in logged] for t in range(1, depth + 1)]
        ax_exit.stackplot(steps, shares, labels=[f"t = {t}" for t in range(1, depth + 1)])
        ax_exit.legend(ncol=2, fontsize=8, loc="upper right")
    ax_exit.set_ylabel("mean exit probability p(t)")
    ax_exit.set_ylim(0, 1)
    for ax in (ax_loss, ax_ce, ax_exit):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle("Pretraining: loss, per-step cross-entropy and exit distribution")
    fig.tight_layout()
    return fig


def save_training_plot(records: list[dict[str, Any]], path: Path) -> Path | None:
    """plot_training as a PNG at `path`; None (and no file) when no training step was logged."""
    from looplm.infra.tracking import pyplot

    if not any("loss" in r for r in records):
        return None
    figure = plot_training(records)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(figure)
    return path


def log_to_mlflow(config: PretrainConfig, result: PretrainResult, tracking_uri: str | None = None) -> Path | None:
    """One MLflow run for the job, written from the driver: params = the config, metrics = the logged records,
    and the training plot (<output>/training.png, logged as plots/training.png). Returns the plot's path."""
    from looplm.infra.tracking import pipeline_run

    from .training.trainer import RUN_INFO

    with pipeline_run(f"pretrain-{config.name}", config=config, tracking_uri=tracking_uri) as run:
        run.set_tags({"looplm.transformer_impl": config.parallel.transformer_impl})
        info_file = result.output / RUN_INFO
        if info_file.is_file():  # what the workers resolved ("auto" precision and optimizer, device, versions)
            run.set_tags({f"looplm.{k}": str(v) for k, v in json.loads(info_file.read_text()).items()})
        for record in result.records:
            metrics = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, int | float)}
            run.log_metrics(metrics, step=int(record["step"]))
        plot = save_training_plot(result.records, result.output / TRAINING_PLOT)
        if plot is not None:
            run.log_artifact(plot, "plots")
    return plot


def print_record(record: dict[str, Any]) -> None:
    if "loss" in record:
        print(
            f"step {record['step']:>6}  loss {record['loss']:.4f}  grad_norm {record['grad_norm']:.3f}  "
            f"lr {record['lr']:.2e}  T {record['recurrent_steps']}  tok/s {record['tokens_per_s']:.0f}  "
            f"TFLOP/s {record['model_tflops_per_s']:.4f}",
            flush=True,
        )
    else:
        print(f"step {record['step']:>6}  validation loss {record['valid_loss']:.4f}", flush=True)


def run_from_args(args) -> int:
    """`looplm train CONFIG [overrides] [--output DIR]`."""
    from looplm.infra.mlflow_server import check_tracking_server

    from .pretrain_inputs import check_inputs

    config = load_config(PretrainConfig, args.config, list(args.overrides or []))
    check_inputs(config)  # the data and starting checkpoint the config names, before Ray starts
    check_tracking_server()  # as eval does: a dead MLFLOW_TRACKING_URI is refused before Ray starts
    output = Path(getattr(args, "output", None) or Path("runs") / f"train-{config.name}")
    parallel = config.parallel
    print(
        f"training {config.model.preset} ({parallel.transformer_impl} layers, TP={parallel.tensor_parallel}"
        f" x PP={parallel.pipeline_parallel} x DP={config.launch.data_parallel} = {config.world_size} workers,"
        f" {config.train.objective}) for {config.train.steps} steps -> {output}"
    )
    result = launch(config, output, on_record=print_record)
    print(f"latest checkpoint: {result.checkpoint}")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        plot = log_to_mlflow(config, result)
    else:
        plot = save_training_plot(result.records, result.output / TRAINING_PLOT)
        print("MLFLOW_TRACKING_URI is not set: metrics are in", output / METRICS_FILE)
    if plot is not None:
        print(f"training curves: {plot}")
    return 0
