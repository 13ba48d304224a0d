"""The executor with small test-only step functions on a real local Ray: hashing, caching, resume, force,
dry-run explanations, locks, and a root on a pyarrow filesystem."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import ray.cloudpickle

from looplm.platform.executor import (
    LOCK_FILE,
    RECORD_FILE,
    STEP_FILE,
    SUCCESS,
    LockHeldError,
    LockSettings,
    Step,
    StepFailedError,
    StepLock,
    Storage,
    format_plan,
    plan,
    run_steps,
    status_rows,
)

# The step functions and records below live in this test module, which Ray's workers cannot import by name.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class CountConfig:
    n: int = 5
    progress: bool = True  # a runtime field: never in the hash
    num_cpus: int | None = None  # another


@dataclass(frozen=True)
class SumConfig:
    scale: int = 1
    needs: str | None = None  # a file that must exist, else the step fails (how a test makes a step fail)


@dataclass(frozen=True)
class Numbers:
    path: str
    count: int


@dataclass(frozen=True)
class Total:
    total: int
    attempts: int


def write_numbers(config: CountConfig, inputs, context) -> Numbers:
    (context.output / "numbers.txt").write_text("\n".join(str(i) for i in range(config.n)))
    return Numbers("numbers.txt", config.n)


def add_numbers(config: SumConfig, inputs, context) -> Total:
    # What an earlier attempt left in the folder is still there on resume: count the attempts.
    attempts_file = context.output / "attempts"
    attempts = int(attempts_file.read_text()) + 1 if attempts_file.exists() else 1
    attempts_file.write_text(str(attempts))
    if config.needs is not None and not Path(config.needs).exists():
        raise FileNotFoundError(f"{config.needs} is missing")
    numbers = inputs["numbers"]
    values = [int(v) for v in numbers.path(numbers.record.path).read_text().split()]
    return Total(config.scale * sum(values), attempts)


def chain(count: CountConfig = CountConfig(), total: SumConfig = SumConfig()) -> list[Step]:
    first = Step("count", write_numbers, count)
    return [first, Step("sum", add_numbers, total, inputs={"numbers": first})]


@pytest.fixture(scope="module")
def step_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("step-cache")


@pytest.fixture(scope="module", autouse=True)
def local_ray(step_cache):
    from looplm.infra.ray_cluster import ray_session

    # Where tasks keep working copies of folders on a non-local root (the last test).
    with ray_session(num_cpus=2, runtime_env={"env_vars": {"LOOPLM_STEP_CACHE": str(step_cache)}}):
        yield


def test_steps_run_then_rerun_all_cached(tmp_path, capsys):
    first = run_steps(chain(), tmp_path)
    assert first.records["sum"] == Total(10, 1)
    for name, folder in first.folders.items():
        folder = Path(folder)
        assert folder.parent == tmp_path and folder.name.startswith(f"{name}-")
        assert (folder / SUCCESS).exists() and not (folder / LOCK_FILE).exists()
        assert json.loads((folder / RECORD_FILE).read_text())["fields"] == first.records[name].__dict__
    marker = Path(first.folders["count"]) / SUCCESS
    stamp = marker.stat().st_mtime_ns
    second = run_steps(chain(), tmp_path)
    assert [row[1] for row in second.table] == ["cached", "cached"]
    assert second.records == first.records and marker.stat().st_mtime_ns == stamp
    assert "cached/run" in capsys.readouterr().out  # the final table


def test_hash_covers_result_fields_and_upstream_not_runtime_fields(tmp_path):
    storage = Storage.at(tmp_path)
    base = {p.step.name: p.hash for p in plan(chain(), storage)}
    runtime = {p.step.name: p.hash for p in plan(chain(CountConfig(progress=False, num_cpus=7)), storage)}
    assert runtime == base
    changed = {p.step.name: p.hash for p in plan(chain(CountConfig(n=6)), storage)}
    assert changed["count"] != base["count"] and changed["sum"] != base["sum"]  # downstream follows upstream
    only_sum = {p.step.name: p.hash for p in plan(chain(total=SumConfig(scale=2)), storage)}
    assert only_sum["count"] == base["count"] and only_sum["sum"] != base["sum"]


def test_failed_step_resumes_in_its_folder_and_upstream_is_untouched(tmp_path):
    needed = tmp_path / "needed"
    steps = chain(total=SumConfig(needs=str(needed)))
    with pytest.raises(StepFailedError, match="step 'sum' failed"):
        run_steps(steps, tmp_path / "root")
    count_folder = next((tmp_path / "root").glob("count-*"))
    sum_folder = next((tmp_path / "root").glob("sum-*"))
    assert (count_folder / SUCCESS).exists() and not (sum_folder / SUCCESS).exists()
    assert (sum_folder / STEP_FILE).exists() and not (sum_folder / LOCK_FILE).exists()  # the lock was released
    stamp = (count_folder / "numbers.txt").stat().st_mtime_ns
    assert "an earlier run did not finish" in format_plan(plan(steps, Storage.at(tmp_path / "root")))
    needed.write_text("")
    result = run_steps(steps, tmp_path / "root")
    assert [row[1] for row in result.table] == ["cached", "run"]
    assert result.records["sum"] == Total(10, 2)  # the second attempt, in the same folder
    assert (count_folder / "numbers.txt").stat().st_mtime_ns == stamp


def test_force_reruns_the_step_and_downstream_from_an_empty_folder(tmp_path):
    run_steps(chain(), tmp_path)
    forced = run_steps(chain(), tmp_path, force=["count"])
    assert [row[1] for row in forced.table] == ["run", "run"]
    assert forced.records["sum"] == Total(10, 1)  # the sum step's folder was emptied: a first attempt again
    only_sum = run_steps(chain(), tmp_path, force=["sum"])
    assert [row[1] for row in only_sum.table] == ["cached", "run"]
    with pytest.raises(ValueError, match="no such step"):
        run_steps(chain(), tmp_path, force=["nope"])


def test_dry_run_names_the_changed_field_and_marks_downstream(tmp_path):
    run_steps(chain(), tmp_path)
    planned = plan(chain(CountConfig(n=7)), Storage.at(tmp_path))
    assert [p.action for p in planned] == ["run", "run"]
    text = format_plan(planned)
    assert "config n: 5 -> 7" in text
    assert "input numbers: count-" in text  # the downstream step names its changed input
    assert [p.action for p in plan(chain(CountConfig(progress=False)), Storage.at(tmp_path))] == ["skip", "skip"]


def test_a_dead_drivers_lock_expires_and_a_live_one_blocks(tmp_path):
    storage = Storage.at(tmp_path)
    steps = [Step("step", write_numbers, CountConfig())]
    folder = plan(steps, storage)[0].folder
    Path(folder).mkdir()
    stale = {"owner": "gone:1:x", "heartbeat": time.time() - 120}
    Path(folder, LOCK_FILE).write_text(json.dumps(stale))
    lock = StepLock(storage, folder, LockSettings(heartbeat_s=0.2, expiry_s=5, wait_s=1))
    lock.acquire()  # taken over: the heartbeat is older than expiry_s
    time.sleep(0.5)
    assert json.loads(Path(folder, LOCK_FILE).read_text())["owner"] == lock.owner
    other = StepLock(storage, folder, LockSettings(heartbeat_s=0.2, expiry_s=5, wait_s=0.5))
    with pytest.raises(LockHeldError, match="held by"):
        other.acquire()  # the heartbeat is live
    assert status_rows(steps, tmp_path)[0][1].startswith(f"running by {lock.owner}")
    lock.release()
    assert not Path(folder, LOCK_FILE).exists() and status_rows(steps, tmp_path)[0][1] == "not run"


def test_the_lock_of_a_killed_process_on_this_host_is_taken_over_at_once(tmp_path):
    storage = Storage.at(tmp_path)
    folder = plan([Step("step", write_numbers, CountConfig())], storage)[0].folder
    Path(folder).mkdir()
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()
    holder = {"owner": "x", "host": socket.gethostname(), "pid": killed.pid, "heartbeat": time.time()}
    Path(folder, LOCK_FILE).write_text(json.dumps(holder))  # a fresh heartbeat: kill -9 right after a beat
    lock = StepLock(storage, folder, LockSettings(heartbeat_s=0.2, expiry_s=60, wait_s=1))
    lock.acquire()  # without waiting out expiry_s
    assert json.loads(Path(folder, LOCK_FILE).read_text())["owner"] == lock.owner
    lock.release()


def test_a_root_on_a_pyarrow_filesystem(tmp_path, step_cache):
    import pyarrow.fs

    remote = tmp_path / "bucket"
    remote.mkdir()
    filesystem = pyarrow.fs.SubTreeFileSystem(str(remote), pyarrow.fs.LocalFileSystem())
    os.environ["LOOPLM_STEP_CACHE"] = str(step_cache)  # the driver side (the tasks have it from the fixture)
    try:
        result = run_steps(chain(), "runs", filesystem=filesystem)
        assert result.records["sum"] == Total(10, 1)
        uploaded = next((remote / "runs").glob("count-*"))
        assert (uploaded / SUCCESS).exists() and (uploaded / "numbers.txt").read_text().startswith("0\n1")
        assert (uploaded / RECORD_FILE).exists() and not (uploaded / LOCK_FILE).exists()
        again = run_steps(chain(total=replace(SumConfig(), scale=2)), "runs", filesystem=filesystem)
        assert again.records["sum"] == Total(20, 1) and [r[1] for r in again.table] == ["cached", "run"]
    finally:
        del os.environ["LOOPLM_STEP_CACHE"]


def test_a_step_that_is_never_cached_runs_every_time_and_its_inputs_stay_cached(tmp_path):
    count = Step("count", write_numbers, CountConfig())
    live = Step("sum", add_numbers, SumConfig(), inputs={"numbers": count}, cacheable=False)
    first = run_steps([live], tmp_path)
    second = run_steps([live], tmp_path)
    assert [row[1] for row in first.table] == ["run", "run"] and [row[1] for row in second.table] == ["cached", "run"]
    assert second.records["sum"] == Total(10, 1)  # from an emptied folder each time
    assert "never cached" in format_plan(plan([live], Storage.at(tmp_path)))
