"""The demo experiment, scaled down, through the executor on a real local Ray with a real MLflow server.

One training run is shared by the module: the first pipeline run fails in evaluation (its data file does not
exist yet: a bad input of the test's making, no hook in the code), the rerun resumes there, a third run is all
cache hits. The other tests read those outputs: the hand-off (batches hold the curated tokens, the export carries
the tokenizer), the endpoint the deploy step leaves answering the `openai` client, the dry run after a training
field changes, `kill -9` of a driver mid-training (the losses of its
resumed run equal the uninterrupted run's), and `ray job submit` to a `ray start --head` on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest

from looplm.platform.executor import SUCCESS, Storage, format_plan, plan
from looplm.platform.experiment import DEMO, load_experiment, run_experiment

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
REGISTERED = "looplm-pipeline-test"

# configs/demo.yaml at a size that trains in seconds: the same steps, kinds and hand-offs.
SMALL = [
    "name=pipeline-test",
    "steps.curate.config.sources.bios.count=120",
    "steps.curate.config.sources.mano.count=20",
    "steps.curate.config.batch_size=64",
    "steps.curate.config.progress=false",
    "steps.curate.config.tokenizer.vocab_size=512",
    "steps.pretrain.config.data.seq_len=32",
    "steps.pretrain.config.data.micro_batch_size=4",
    "steps.pretrain.config.data.global_batch_size=4",
    "steps.pretrain.config.train.steps=12",
    "steps.pretrain.config.train.log_interval=1",
    "steps.pretrain.config.train.checkpoint_interval=4",
    "steps.pretrain.config.train.keep_checkpoints=null",
    "steps.pretrain.config.optim.warmup_steps=2",
    "steps.pretrain.config.optim.decay_steps=4",
    "steps.gate.config.data.seq_len=32",
    "steps.gate.config.data.micro_batch_size=4",
    "steps.gate.config.data.global_batch_size=4",
    "steps.gate.config.train.steps=3",
    "steps.gate.config.train.checkpoint_interval=3",
    "steps.evaluate.config.max_steps=4",
    "steps.evaluate.config.data.seq_len=32",
    "steps.evaluate.config.data.max_sequences=8",
    "steps.evaluate.config.exits.q_thresholds=[0.0,0.5,1.0]",
    "steps.evaluate.config.exits.histogram_thresholds=[0.5]",
    "steps.evaluate.config.exits.hdiff_quantiles=[0.5]",
    f"steps.register.config.name={REGISTERED}",
    "steps.deploy.config.name=pipeline-test",
    "steps.deploy.config.num_cpus=0.5",
]


@dataclass(frozen=True)
class Pipeline:
    root: Path
    eval_text: Path
    overrides: list[str]
    tracking_uri: str
    failed_first: str  # the StepFailedError message of the first run
    runs: list  # PipelineResult of the second (resumed) and third (cached) runs
    train_stamp: dict[str, int]  # file -> mtime_ns of the training outputs after the first run


def small_overrides(root: Path, eval_text: Path) -> list[str]:
    return [
        *SMALL,
        f"root={root}",
        f"steps.evaluate.config.data.path={eval_text}",
        f"steps.deploy.config.port={_free_port()}",
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def local_ray():
    from looplm.infra.ray_cluster import ray_session

    with ray_session(num_cpus=2, runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}}):
        yield


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, mlflow_server, local_ray) -> Pipeline:
    from looplm.platform.executor import StepFailedError

    folder = tmp_path_factory.mktemp("pipeline")
    root, eval_text = folder / "root", folder / "eval.jsonl"
    overrides = small_overrides(root, eval_text)
    experiment = load_experiment(DEMO, overrides)
    with pytest.raises(StepFailedError) as failed:
        run_experiment(experiment, tracking_uri=mlflow_server.url)
    trained = [p for name in ("pretrain", "gate") for p in root.glob(f"{name}-*/**/*") if p.is_file()]
    stamp = {str(p): p.stat().st_mtime_ns for p in trained}
    from looplm.pipelines import synthetic

    texts = synthetic.biographies(20, seed=1000, exposures=1)
    eval_text.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    resumed = run_experiment(experiment, tracking_uri=mlflow_server.url)
    cached = run_experiment(experiment, tracking_uri=mlflow_server.url)
    return Pipeline(root, eval_text, overrides, mlflow_server.url, str(failed.value), [resumed, cached], stamp)


def test_failure_in_evaluation_resumes_there_without_retraining(pipeline):
    assert "step 'evaluate' failed" in pipeline.failed_first and "eval.jsonl not found" in pipeline.failed_first
    resumed = {row[0]: row[1] for row in pipeline.runs[0].table}
    assert resumed == {
        "curate": "cached",
        "pretrain": "cached",
        "gate": "cached",
        "evaluate": "run",
        "register": "run",
        "deploy": "run",
    }
    assert pipeline.train_stamp  # the training outputs, untouched by the resumed run
    for path, stamp in pipeline.train_stamp.items():
        assert Path(path).stat().st_mtime_ns == stamp, path


def test_every_step_hands_off_and_mlflow_holds_the_runs_and_the_model(pipeline):
    from mlflow.tracking import MlflowClient

    result = pipeline.runs[0]
    uri = result.records["register"].model_uri
    assert uri.startswith(f"models:/{REGISTERED}/")
    assert set(result.records["evaluate"].metrics) >= {"val_loss", "val_acc", "loss_step_1", "loss_step_4"}
    client = MlflowClient(pipeline.tracking_uri)
    experiment = client.get_experiment_by_name("looplm")
    runs = client.search_runs([experiment.experiment_id], "attributes.run_name LIKE 'pipeline-test%'")
    parents = [r for r in runs if r.info.run_name == "pipeline-test"]
    assert len(parents) == 3  # one per pipeline execution
    nested = {}
    for run in runs:
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent is not None:
            nested.setdefault(parent, {})[run.data.tags["looplm.step"]] = run.info.status
    first, second = sorted(parents, key=lambda r: r.info.start_time)[:2]
    assert nested[first.info.run_id] == {
        "curate": "FINISHED",
        "pretrain": "FINISHED",
        "gate": "FINISHED",
        "evaluate": "FAILED",
    }
    assert nested[second.info.run_id] == {"evaluate": "FINISHED", "register": "FINISHED", "deploy": "FINISHED"}
    assert second.data.tags["looplm.cached.pretrain"].endswith(Path(result.folders["pretrain"]).name)
    version = client.get_model_version(REGISTERED, uri.rsplit("/", 1)[1])
    assert version.status == "READY"
    from looplm.model import load_pretrained

    registered = load_pretrained(_download(uri, pipeline.tracking_uri))  # registered as exported, no manual step
    assert registered.config.vocab_size == 1024


def _download(uri: str, tracking_uri: str) -> Path:
    from looplm.infra.registry import resolve_model_dir

    return resolve_model_dir(uri, tracking_uri=tracking_uri)


def test_second_run_is_all_cache_hits_up_to_the_deployment(pipeline):
    cached = pipeline.runs[1]
    assert [row[1] for row in cached.table] == ["cached"] * 5 + ["run"]  # a live endpoint is deployed every time
    assert cached.records == pipeline.runs[0].records


def test_the_deployed_endpoint_serves_the_registered_model_to_the_openai_client(pipeline):
    from openai import OpenAI

    endpoint = pipeline.runs[1].records["deploy"]
    assert endpoint.served == pipeline.runs[1].records["register"].model_uri  # from the registry, by its URI
    assert endpoint.base_url.startswith("http://127.0.0.1:")
    client = OpenAI(base_url=endpoint.base_url, api_key="unused")
    assert [m.id for m in client.models.list().data] == [endpoint.model]
    completion = client.completions.create(model=endpoint.model, prompt="Alice was born", max_tokens=8, temperature=0)
    assert completion.usage.completion_tokens == 8 and completion.choices[0].text
    assert 1 <= completion.usage.average_recurrent_steps <= 4


def test_training_batches_hold_the_curated_tokens_and_the_export_carries_the_tokenizer(pipeline):
    from looplm.pipelines.curation.pack import open_indexed
    from looplm.pipelines.training.config import PretrainConfig
    from looplm.pipelines.training.data import build_datasets, micro_batch, read_manifest

    curated = Path(pipeline.runs[0].folders["curate"]) / "curated"
    trained = Path(pipeline.runs[0].folders["pretrain"])
    config = json.loads((trained / "config.json").read_text())  # what the training run was given
    assert config["data"]["manifest"] == str(curated) and not config["data"]["paths"]
    manifest = read_manifest(curated)
    assert config["data"]["eod_token"] == manifest.eod_id
    assert config["model"]["overrides"]["eos_token_id"] == manifest.eod_id
    hf_config = json.loads((trained / "hf" / "config.json").read_text())
    assert hf_config["eos_token_id"] == manifest.eod_id
    assert (trained / "hf" / "tokenizer.json").read_bytes() == (curated / "tokenizer.json").read_bytes()

    # The samples of the first optimizer steps, as the trainer draws them, are windows of the curated streams.
    import torch.distributed as dist

    from looplm.infra.configs import build_config
    from looplm.infra.mlflow_server import free_port

    data = build_config(PretrainConfig, config, "config.json").data
    # Megatron's dataset builder is a collective: a one-process group, as one training rank has.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        train, _ = build_datasets(data, [], 1024, 64, trained / "data" / "cache", manifest=manifest)
    finally:
        dist.destroy_process_group()
    streams = {}
    for prefix in manifest.train[0]:
        documents = open_indexed(prefix)  # by index: megatron's dataset has no end for plain iteration
        tokens = np.concatenate([np.asarray(documents[i]) for i in range(len(documents))])
        streams[prefix] = tokens.astype(np.int64).tobytes()
    sources = set()
    for step in range(4):
        ids, labels = micro_batch(train, step * data.global_batch_size, 0, data, 0, 1)
        for row_ids, row_labels in zip(ids, labels, strict=True):
            window = np.append(row_ids.numpy(), row_labels.numpy()[-1]).astype(np.int64).tobytes()
            found = [p for p, stream in streams.items() if _contains(stream, window)]
            assert found, f"a training sample of step {step} is not a window of any curated dataset"
            sources.update(found)
    assert len(sources) == 2  # both curated sources are drawn (bios and mano, weights 0.8 / 0.2)


def _contains(stream: bytes, window: bytes) -> bool:
    start = stream.find(window)
    while start != -1:
        if start % 8 == 0:  # aligned to a token
            return True
        start = stream.find(window, start + 1)
    return False


def test_vocabulary_too_large_and_no_data_are_named_errors(pipeline):
    from looplm.infra.configs import load_config
    from looplm.model.config import ConfigError
    from looplm.pipelines.training.config import DataConfig, PretrainConfig
    from looplm.pipelines.training.data import VocabularyTooLargeError, with_manifest

    curated = Path(pipeline.runs[0].folders["curate"]) / "curated"
    tiny = REPO / "configs" / "train-tiny-cpu.yaml"
    small = load_config(
        PretrainConfig, tiny, [f"data.manifest={curated}", "data.generator=null", "model.overrides.vocab_size=256"]
    )
    with pytest.raises(VocabularyTooLargeError, match=r"512 entries but model 'tiny' embeds 256"):
        with_manifest(small)
    with pytest.raises(ConfigError, match="name exactly one source of training data.*got none"):
        DataConfig()
    with pytest.raises(ValueError, match="got manifest and generator"):  # load_config names the file too
        load_config(PretrainConfig, tiny, [f"data.manifest={curated}"])


def test_dry_run_after_a_training_field_changes_marks_training_and_downstream(pipeline, capsys):
    changed = load_experiment(DEMO, [*pipeline.overrides, "steps.pretrain.config.optim.lr=0.002"])
    planned = plan(list(changed.steps), Storage.at(changed.root))
    assert {p.step.name: p.action for p in planned} == {
        "curate": "skip",
        "pretrain": "run",
        "gate": "run",
        "evaluate": "run",
        "register": "run",
        "deploy": "run",
    }
    text = format_plan(planned)
    assert "config optim.lr: 0.003 -> 0.002" in text
    assert "input init: pretrain-" in text and "input model: gate-" in text
    run_experiment(changed, dry_run=True)  # the CLI's path: prints the same plan
    assert "config optim.lr: 0.003 -> 0.002" in capsys.readouterr().out


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "looplm.platform.cli", *args]


def _kill_tree(process: psutil.Process) -> None:
    """SIGKILL a process and every process it started (by pid)."""
    try:
        family = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=20)


def test_kill_9_of_the_driver_mid_training_resumes_from_the_last_checkpoint(pipeline, tmp_path):
    from looplm.pipelines.pretrain import read_metrics

    reference = Path(pipeline.runs[0].folders["pretrain"])
    root = tmp_path / "root"
    overrides = small_overrides(root, pipeline.eval_text)
    # The curated folder copied over: a shared root at a second place (its hash names the same step).
    curate = Path(pipeline.runs[0].folders["curate"])
    shutil.copytree(curate, root / curate.name)
    env = {**os.environ, "LOOPLM_LOCK_HEARTBEAT_S": "1", "LOOPLM_LOCK_EXPIRY_S": "4"}
    env.pop("MLFLOW_TRACKING_URI", None)
    driver = subprocess.Popen(
        _cli("run", str(DEMO), *overrides, "--until", "pretrain"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    process = psutil.Process(driver.pid)
    metrics = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        found = list(root.glob("pretrain-*/metrics.jsonl"))
        if found and (found[0].parent / "checkpoints" / "latest").exists():
            metrics = found[0]
            steps = [r["step"] for r in _records(metrics)]
            if steps and 5 <= max(steps) < 12:
                break
        time.sleep(0.2)
    assert metrics is not None and driver.poll() is None, "the driver ended before it could be killed mid-training"
    _kill_tree(process)  # the driver and the local Ray it started
    folder = metrics.parent
    killed_at = max(r["step"] for r in _records(metrics))
    assert not (folder / SUCCESS).exists() and killed_at < 12
    time.sleep(4.5)  # the lock's heartbeat is now older than LOOPLM_LOCK_EXPIRY_S
    rerun = subprocess.run(
        _cli("run", str(DEMO), *overrides, "--until", "pretrain"), env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert (folder / SUCCESS).exists()
    said = re.search(r"resuming from \S+step_0*(\d+) at step (\d+) of 12", rerun.stdout + rerun.stderr)
    assert said and said.group(1) == said.group(2) and int(said.group(2)) <= killed_at  # the run says so
    # The local Ray has its dashboard, whose State API Ray Train's placement-group cleaner polls: no warning flood.
    assert "Failed to query Ray Train Controller actor state" not in rerun.stdout + rerun.stderr
    lines = _records(metrics)
    # Resumed from a checkpoint, not from scratch: step 1 was logged once, by the killed run.
    assert [r["step"] for r in lines].count(1) == 1
    assert max(r["step"] for r in lines) == 12
    resumed = {r["step"]: r for r in read_metrics(folder) if "loss" in r}
    uninterrupted = {r["step"]: r for r in read_metrics(reference) if "loss" in r}
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 13))
    for step, record in uninterrupted.items():
        assert resumed[step]["loss"] == record["loss"], step
        assert resumed[step]["grad_norm"] == record["grad_norm"], step


def _records(metrics: Path) -> list[dict]:
    """Every record of a metrics.jsonl, in order; a line torn by the kill is not one."""
    records = []
    for line in metrics.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def test_ray_job_submit_to_a_local_head_puts_outputs_where_the_executor_says(tmp_path):
    from looplm.infra.mlflow_server import free_port

    temp = Path("/tmp") / f"looplm-job-{os.getpid()}"  # short: Ray's socket paths must stay under 108 bytes
    port, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.pop("MLFLOW_TRACKING_URI", None)
    # Ray's CLI through this interpreter (not the `ray` script, whose shebang may name another environment's Python):
    # the head's workers then run the Python, and the looplm, that this test imports.
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    head = [*ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2"]
    head += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"]
    head += [f"--temp-dir={temp}", "--disable-usage-stats"]
    # Every fixed default port free-picked: other Ray clusters on this host hold the defaults (the dashboard
    # agent's 52365 taken means "No available agent to submit job").
    for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port"):
        head.append(f"--{flag}={free_port()}")
    head += [f"--runtime-env-agent-port={free_port()}", f"--ray-client-server-port={free_port()}"]
    root = tmp_path / "job-root"
    overrides = [*small_overrides(root, tmp_path / "unused.jsonl"), "steps.curate.config.sources.bios.count=40"]
    try:
        started = subprocess.run(head, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        submit = [*ray, "job", "submit", f"--address=http://127.0.0.1:{dashboard}", f"--working-dir={REPO}"]
        submit += ["--runtime-env-json", json.dumps({"excludes": [".venv", "runs", ".git"]}), "--"]
        # The head runs this checkout's environment, so the job's Python is ours (on a cluster: the image's).
        submit += [sys.executable, "-m", "looplm.platform.cli", "run", "configs/demo.yaml", *overrides]
        submit += ["--until", "curate"]
        deadline = time.monotonic() + 120
        while True:  # the head's dashboard agent comes up a little after `ray start` returns
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
            if "No available agent to submit job" not in job.stderr or time.monotonic() > deadline:
                break
            time.sleep(3)
        said = job.stdout + job.stderr
        assert job.returncode == 0 and re.search(r"Job '\w+' succeeded", said), said[-6000:]
    finally:
        for process in psutil.process_iter(["cmdline"]):  # the head's processes, by pid: those of its temp dir
            if any(str(temp) in part for part in process.info["cmdline"] or []):
                _kill_tree(process)
        shutil.rmtree(temp, ignore_errors=True)
    experiment = load_experiment(DEMO, overrides)
    where = {p.step.name: p.folder for p in plan([experiment.step("curate")], Storage.at(experiment.root))}
    assert where["curate"] in said  # the executor's table, printed by the job
    assert (Path(where["curate"]) / SUCCESS).exists()
    assert (Path(where["curate"]) / "curated" / "mixture.json").exists()


def test_the_experiment_names_bad_fields_with_file_and_path():
    from looplm.infra.configs import ConfigFileError

    with pytest.raises(ConfigFileError, match=r"demo.yaml: steps.pretrain.config.train: unknown field\(s\) stpes"):
        load_experiment(DEMO, ["steps.pretrain.config.train.stpes=3"])
    with pytest.raises(ConfigFileError, match=r"demo.yaml: steps.gate.inputs.init: 'nope' is not an earlier step"):
        load_experiment(DEMO, ["steps.gate.inputs.init=nope"])
    with pytest.raises(ConfigFileError, match=r"sources has no item named 'web'"):
        load_experiment(DEMO, ["steps.curate.config.sources.web.count=3"])
