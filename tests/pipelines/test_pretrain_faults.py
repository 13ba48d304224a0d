"""A training job's network exposure, and reruns over what a crash leaves behind (issue 12), on a real local Ray
and a real `mlflow server`.

One 2-worker job (a module fixture, ~30 s) trains 6 steps with checkpoints at steps 3 and 6; while it runs, every
listening TCP socket of its process tree (this process, the local Ray it starts: GCS, raylet, agents, the Train
controller and both workers) is listed. Then:
- each listener is on loopback (before the fix, the rank-0 worker's TCPStore listened on `::`);
- each kind of file of the newest checkpoint, truncated, is named and the launch falls back to the previous one;
  none readable is a CheckpointError that sets nothing aside;
- `looplm train` reruns over a torn last line of metrics.jsonl, a truncated tensor file of the newest checkpoint
  and an MLflow server stopped mid-run: it succeeds, says each, and the spilled run lands once the server is back.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from looplm.infra.configs import load_config
from looplm.infra.mlflow_server import MlflowServer, MlflowServerConfig
from looplm.infra.ray_cluster import ray_session
from looplm.infra.spill import main as spill_main
from looplm.model.checkpoint import CheckpointError
from looplm.model.config import ConfigError
from looplm.pipelines.pretrain import launch
from looplm.pipelines.training import checkpoints
from looplm.pipelines.training.config import PretrainConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "train-tiny-cpu.yaml")
OVERRIDES = [
    "data.seq_len=32",
    "data.micro_batch_size=4",
    "data.global_batch_size=8",
    "train.log_interval=2",
    "launch.data_parallel=2",
    "train.checkpoint_interval=3",
    "train.keep_checkpoints=2",
]


@dataclass(frozen=True)
class Listener:
    pid: int
    process: str
    address: str
    port: int


def listening_sockets() -> list[Listener]:
    """Every listening TCP socket (IPv4 and IPv6) of this process and all its descendants."""
    found = []
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            name = " ".join(process.cmdline())[:120]
            connections = process.net_connections(kind="tcp")
        except psutil.Error:  # gone meanwhile
            continue
        found += [Listener(process.pid, name, c.laddr.ip, c.laddr.port) for c in connections if c.status == "LISTEN"]
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@dataclass(frozen=True)
class FirstRun:
    output: Path
    pristine: Path  # a copy of its checkpoints folder, as the job left it
    listeners: list[Listener]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> FirstRun:
    folder = tmp_path_factory.mktemp("faults")
    listeners: list[Listener] = []

    def look(record: dict) -> None:  # the first logged step: both workers and their process group are up
        if not listeners:
            listeners.extend(listening_sockets())

    config = load_config(PretrainConfig, TINY, [*OVERRIDES, "train.steps=6"])
    launch(config, folder / "run", on_record=look)
    shutil.copytree(folder / "run" / "checkpoints", folder / "pristine")
    return FirstRun(folder / "run", folder / "pristine", listeners)


@pytest.mark.slow
def test_a_single_node_training_job_listens_on_loopback_only(first_run):
    workers = {item.pid for item in first_run.listeners if "RayTrainWorker" in item.process}
    assert len(workers) == 2, f"the listing did not see both training workers: {first_run.listeners}"
    assert any("gcs_server" in item.process for item in first_run.listeners)  # and Ray's own servers
    exposed = [item for item in first_run.listeners if not is_loopback(item.address)]
    assert not exposed, f"listening beyond loopback: {exposed}"


DAMAGED_FILES = ["trainer.json", "rank_1.pt", "state/.metadata", "state/common.pt", "state/metadata.json"]


@pytest.mark.slow
@pytest.mark.parametrize("damaged", [*DAMAGED_FILES, "state/*.distcp"])
def test_a_truncated_file_of_the_latest_checkpoint_is_named_and_the_previous_one_is_used(
    first_run, tmp_path, damaged, capsys
):
    root = tmp_path / "checkpoints"
    shutil.copytree(first_run.pristine, root)
    newest = root / "step_00000006"
    (victim,) = sorted(newest.glob(damaged))[:1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    said: list[str] = []
    assert checkpoints.resume_point(root, say=said.append) == root / "step_00000003"
    assert (root / "latest").read_text().strip() == "step_00000003"
    assert not newest.exists() and (root / "step_00000006.unreadable").is_dir()
    assert str(newest) in said[0] and victim.name in said[0] and "set aside" in said[0]
    assert "falling back to the previous complete checkpoint" in said[1] and "step_00000003" in said[1]


@pytest.mark.slow
def test_latest_naming_a_folder_that_is_gone_resumes_from_the_newest_readable_one(first_run, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(first_run.pristine, root)
    shutil.rmtree(root / "step_00000006")
    said: list[str] = []
    assert checkpoints.resume_point(root, say=said.append) == root / "step_00000003"
    assert (root / "latest").read_text().strip() == "step_00000003"
    assert "names step_00000006, which is not there" in said[0] and "step_00000003" in said[-1]


@pytest.mark.slow
def test_a_checkpoint_of_another_optimizer_is_a_config_error_before_ray_starts(first_run, tmp_path):
    import ray

    shutil.copytree(first_run.pristine, tmp_path / "run" / "checkpoints")
    config = load_config(PretrainConfig, TINY, [*OVERRIDES, "train.steps=8", "optim.implementation=megatron"])
    with pytest.raises(ConfigError, match="holds torch-adamw optimizer state but this run steps with megatron"):
        launch(config, tmp_path / "run")  # it was a worker error, which Ray Train retried
    assert not ray.is_initialized()


@pytest.mark.slow
def test_no_readable_checkpoint_is_an_error_that_names_each_file_and_moves_nothing(first_run, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(first_run.pristine, root)
    for folder in ("step_00000003", "step_00000006"):
        (root / folder / "rank_0.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no readable checkpoint") as raised:
        checkpoints.resume_point(root)
    assert str(raised.value).count("rank_0.pt") == 2
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000006"]


@pytest.mark.slow
def test_a_rerun_over_a_torn_log_a_damaged_checkpoint_and_a_tracking_outage_succeeds_and_says_each(
    first_run, tmp_path, monkeypatch
):
    output = first_run.output
    with open(output / "metrics.jsonl", "a") as log:  # what a kill -9 mid-write leaves
        log.write('{"step": 7, "loss": 6.1')
    (distcp, *_) = sorted((output / "checkpoints" / "step_00000006" / "state").glob("*.distcp"))
    distcp.write_bytes(distcp.read_bytes()[:1000])
    server = MlflowServer(MlflowServerConfig(root=str(tmp_path / "mlflow"))).start()
    monkeypatch.setenv("LOOPLM_TRACKING_SPILL_DIR", str(tmp_path / "spill"))  # the run's and the replay's
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url}
    command = [sys.executable, "-m", "looplm.platform.cli", "train", TINY, *OVERRIDES, "train.steps=8"]
    lines = []
    # A second Ray on this host while the job runs (another job, parallel tests): Ray Train's helpers must still
    # find their own cluster (its placement-group cleaner died with "Found multiple active Ray instances").
    with ray_session(num_cpus=1):
        driver = subprocess.Popen(
            [*command, "--output", str(output)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        watchdog = threading.Timer(300, driver.kill)
        watchdog.start()
        try:
            for line in driver.stdout:
                lines.append(line)
                if line.startswith("step ") and server.pid is not None:
                    server.stop()  # the tracking server goes down while the run trains
        finally:
            watchdog.cancel()
            server.stop()
    said = "".join(lines)
    assert driver.wait() == 0, said[-4000:]
    assert server.pid is None  # it was stopped before the run ended
    assert "Traceback" not in said and "Failed to query" not in said  # nothing that reads as a failure
    # The damaged checkpoint is named with its file, set aside, and the run resumed from the one before it.
    assert f"checkpoint {output / 'checkpoints' / 'step_00000006'} cannot be loaded ({distcp}" in said
    assert f"falling back to the previous complete checkpoint {output / 'checkpoints' / 'step_00000003'}" in said
    assert f"resuming from {output / 'checkpoints' / 'step_00000003'} at step 3 of 8" in said
    assert (output / "checkpoints" / "step_00000006.unreadable").is_dir()
    assert checkpoints.latest(output / "checkpoints") == output / "checkpoints" / "step_00000008"
    # The torn line is skipped and said; the records after it are whole.
    assert "skipped 1 line(s) a crash left half-written" in said
    # The run's tracking was spilled, and the message says how it will be sent.
    assert "unreachable at the end" in said and f"python -m looplm.infra.spill {server.url}" in said

    back = MlflowServer(MlflowServerConfig(root=str(tmp_path / "mlflow"), port=server.port)).start()
    try:
        assert spill_main([back.url]) == 0  # what the message says to run
        client = MlflowClient(back.url)
        runs = [
            run
            for experiment in client.search_experiments()
            for run in client.search_runs([experiment.experiment_id])
            if run.info.run_name == "pretrain-tiny-cpu"
        ]
        assert len(runs) == 1, [run.info.run_name for run in runs]
        run = runs[0]
        assert run.data.params and run.data.params.get("train.steps") == "8", run.data.params
        losses = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in losses) == [2, 4, 6, 8]
        assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/training.png"]
    finally:
        back.stop()
    assert json.loads((output / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 8
