"""The step executor: a DAG of steps run as Ray tasks, each cached in a folder named by the hash of what it depends on.

    curate = Step("curate", curate_step, CurateConfig(...))
    train = Step("pretrain", pretrain_step, PretrainConfig(...), inputs={"data": curate}, num_cpus=0)
    results = run_steps([curate, train], root="runs/demo")          # or root="s3://bucket/looplm"

A step is a name, a function `fn(config, inputs, context) -> record`, a frozen config and its upstream steps
(by role). Its output folder is `<root>/<name>-<hash>`, where the hash covers the step's function, the config
fields that change the result (not the runtime ones in RUNTIME_FIELDS: Ray address, progress bars, CPU counts,
tracking names) and the hashes of its upstream steps, as Marin's executor does (reference/anchors.md A.1). The
folder holds what the step writes plus:

    _STEP.json    the hashed config and the input hashes (so a dry run can say what changed since a cached version)
    _RECORD.json  the step's typed output record (a frozen dataclass as JSON), which downstream steps read
    _LOCK         owner and heartbeat while a driver runs the step; expires when the heartbeat stops
    _SUCCESS      written last, atomically: the step is done

A rerun skips every step whose `_SUCCESS` exists. A failed or killed run leaves its folder without `_SUCCESS`,
so the next run re-enters the same folder: the step picks up what it left (training resumes from its last
checkpoint). `force` reruns a step from an empty folder, and everything downstream of it.

The steps that run become one graph of Ray tasks: each task gets its upstream tasks' ObjectRefs as arguments,
so Ray starts it when they are done (what `ray.dag` builds, without its `DAGNode.execute()`, deprecated in Ray
2.60; reference/ray-mlflow-notes.md §7); cached steps enter the graph as finished results. Each task takes the
step's lock, runs the function, writes the record and `_SUCCESS`, then releases the lock. The lock is taken inside the
task, so its heartbeat stops when the task dies, whether the task, its worker or the driver that owns it is
killed, and another driver may take the step over once the lock is older than `lock_expiry_s`.

Roots are a local path or a URI that pyarrow's filesystems reach (s3://, gs://, hdfs://, or any fsspec
filesystem wrapped in pyarrow.fs.PyFileSystem). Steps always work in a local folder: for a remote root the step
runs in a local working copy (LOOPLM_STEP_CACHE, default ~/.cache/looplm/steps) that is uploaded before
`_SUCCESS` is written, and inputs are downloaded into the same cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from looplm.model.atomic import atomic_write_text

SUCCESS = "_SUCCESS"
STEP_FILE = "_STEP.json"
RECORD_FILE = "_RECORD.json"
LOCK_FILE = "_LOCK"
# Fields that say where or how a step runs, not what it computes: left out of the hash wherever they appear.
RUNTIME_FIELDS = frozenset(
    {
        "ray_address",
        "executor",  # curate: local and Ray Data write the same bytes (test_local_executor_writes_what_ray_data_writes)
        "progress",
        "num_cpus",
        "mlflow_tracking_uri",
        "max_failures",
        "report_interval",
        "experiment",
        "run_name",
    }
)
HASH_CHARS = 10


class StepFailedError(RuntimeError):
    """A step raised; the message names the step and its output folder (rerun to resume there)."""


class LockHeldError(RuntimeError):
    """Another live driver holds a step's lock and did not release it within the wait."""


@dataclass(frozen=True, eq=False)
class Step:
    name: str
    fn: Callable[..., Any]  # fn(config, inputs: dict[role, Upstream], context: StepContext) -> record (a dataclass)
    config: Any  # a frozen dataclass
    inputs: Mapping[str, Step] = field(default_factory=dict)  # role -> upstream step
    num_cpus: float = 1.0  # 0 for steps that only orchestrate Ray work (Ray Data, Ray Train) from inside the task
    version: int = 0  # bump when the function's result changes for the same config
    # False for a step whose result is a live thing rather than files (a Serve deployment): it runs every time,
    # since a cached record would name an endpoint that may be gone.
    cacheable: bool = True


@dataclass(frozen=True)
class Upstream:
    """What a step receives for each input: the upstream record and the local folder its relative paths are in."""

    name: str
    record: Any
    folder: Path

    def path(self, relative: str) -> Path:
        return self.folder / relative


@dataclass
class StepContext:
    name: str
    output: Path  # the local folder to write into (the output folder itself for a local root)
    tracker: Any = None  # looplm.infra.tracking.RunLogger of this step's nested run, or None without tracking
    fresh: bool = False  # forced: the folder was emptied first

    def progress(self, message: str) -> None:
        print(f"[{self.name}] {message}", flush=True)


# ---------------------------------------------------------------- hashing


def hashed_config(config: Any) -> Any:
    """The config as plain data without runtime fields (RUNTIME_FIELDS, at any depth)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in RUNTIME_FIELDS}
        if isinstance(value, list | tuple):
            return [strip(v) for v in value]
        return value

    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    return strip(json.loads(json.dumps(data, default=str)))


def function_name(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def step_signature(step: Step, hashes: Mapping[str, str]) -> dict[str, Any]:
    """Everything the step's hash covers: what _STEP.json holds."""
    return {
        "name": step.name,
        "function": function_name(step.fn),
        "version": step.version,
        "config": hashed_config(step.config),
        "inputs": {role: f"{up.name}-{hashes[up.name]}" for role, up in sorted(step.inputs.items())},
    }


def digest(signature: Mapping[str, Any]) -> str:
    text = json.dumps(signature, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()[:HASH_CHARS]


def topological(steps: Iterable[Step]) -> list[Step]:
    """The steps and all their upstream steps, each after its inputs; names must be unique."""
    order: list[Step] = []
    seen: dict[str, Step] = {}
    visiting: set[str] = set()

    def visit(step: Step) -> None:
        if step.name in seen:
            if seen[step.name] is not step:
                raise ValueError(f"two different steps are named {step.name!r}")
            return
        if step.name in visiting:
            raise ValueError(f"steps form a cycle through {step.name!r}")
        visiting.add(step.name)
        for upstream in step.inputs.values():
            visit(upstream)
        visiting.discard(step.name)
        seen[step.name] = step
        order.append(step)

    for step in steps:
        visit(step)
    return order


def downstream_of(names: Iterable[str], order: list[Step]) -> set[str]:
    """The named steps and every step that depends on them."""
    marked = set(names)
    for step in order:
        if any(up.name in marked for up in step.inputs.values()):
            marked.add(step.name)
    return marked


# ---------------------------------------------------------------- storage


@dataclass(frozen=True)
class Storage:
    """A root folder on a pyarrow filesystem; `local` is True when paths are plain local paths."""

    root: str
    filesystem: Any = None  # pyarrow.fs.FileSystem; None: the local filesystem

    @staticmethod
    def at(root: str | os.PathLike, filesystem: Any = None) -> Storage:
        root = str(root)
        if filesystem is None and "://" in root and not root.startswith("file://"):
            import pyarrow.fs

            filesystem, path = pyarrow.fs.FileSystem.from_uri(root)
            return Storage(path.rstrip("/"), filesystem)
        if filesystem is None:
            return Storage(str(Path(root.removeprefix("file://")).expanduser().resolve()))
        return Storage(root.rstrip("/"), filesystem)

    @property
    def local(self) -> bool:
        return self.filesystem is None

    def join(self, *parts: str) -> str:
        """A path under the root."""
        return "/".join([self.root, *parts])

    @staticmethod
    def sub(folder: str, *parts: str) -> str:
        """A path under a folder that is already a full path."""
        return "/".join([folder, *parts])

    def exists(self, path: str) -> bool:
        if self.local:
            return os.path.exists(path)
        import pyarrow.fs

        return self.filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def read_text(self, path: str) -> str | None:
        if self.local:
            try:
                return Path(path).read_text()
            except FileNotFoundError:
                return None
        if not self.exists(path):
            return None
        with self.filesystem.open_input_stream(path) as source:
            return source.read().decode()

    def write_text(self, path: str, text: str) -> None:
        """Atomic on a local root (rename); a single object write elsewhere (object stores publish whole)."""
        if self.local:
            atomic_write_text(path, text)
            return
        self.filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.filesystem.open_output_stream(path) as sink:
            sink.write(text.encode())

    def create_exclusive(self, path: str, text: str) -> bool:
        """Create `path` only if it does not exist; False when it did. Atomic on local disks (O_EXCL)."""
        if self.local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            try:
                handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(handle, "w") as out:
                out.write(text)
            return True
        if self.exists(path):  # object stores have no O_EXCL: write, then read back who won
            return False
        self.write_text(path, text)
        return self.read_text(path) == text

    def delete(self, path: str) -> None:
        if self.local:
            Path(path).unlink(missing_ok=True)
        elif self.exists(path):
            self.filesystem.delete_file(path)

    def clear_folder(self, path: str, keep: str) -> None:
        """Remove everything in the folder but the entry named `keep`."""
        if self.local:
            for entry in Path(path).iterdir() if os.path.isdir(path) else ():
                if entry.name == keep:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            return
        import pyarrow.fs

        for name in self.listdir(path):
            if name != keep:
                target = self.sub(path, name)
                if self.filesystem.get_file_info(target).type == pyarrow.fs.FileType.Directory:
                    self.filesystem.delete_dir(target)
                else:
                    self.filesystem.delete_file(target)

    def listdir(self, path: str) -> list[str]:
        if self.local:
            return sorted(os.listdir(path)) if os.path.isdir(path) else []
        import pyarrow.fs

        if not self.exists(path):
            return []
        infos = self.filesystem.get_file_info(pyarrow.fs.FileSelector(path))
        return sorted(Path(i.path).name for i in infos)

    def mtime(self, path: str) -> float:
        if self.local:
            return os.path.getmtime(path)
        info = self.filesystem.get_file_info(path)
        return info.mtime.timestamp() if info.mtime else 0.0

    def local_folder(self, path: str) -> Path:
        """Where a step works on (or reads) the folder `path`: itself on a local root, a cached copy elsewhere."""
        if self.local:
            return Path(path)
        cache = Path(os.environ.get("LOOPLM_STEP_CACHE") or Path.home() / ".cache" / "looplm" / "steps")
        key = hashlib.blake2b(f"{self.filesystem.type_name}|{path}".encode(), digest_size=6).hexdigest()
        return cache / f"{Path(path).name}-{key}"

    def download(self, path: str) -> Path:
        local = self.local_folder(path)
        if self.local or (local / SUCCESS).exists():
            return local
        import pyarrow.fs

        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        pyarrow.fs.copy_files(path, str(local), source_filesystem=self.filesystem)
        return local

    def upload(self, local: Path, path: str) -> None:
        if self.local:
            return
        import pyarrow.fs

        self.filesystem.create_dir(path, recursive=True)
        pyarrow.fs.copy_files(
            str(local),
            path,
            source_filesystem=pyarrow.fs.LocalFileSystem(),
            destination_filesystem=self.filesystem,
        )


# ---------------------------------------------------------------- records


def record_to_json(record: Any) -> str:
    if not (dataclasses.is_dataclass(record) and not isinstance(record, type)):
        raise TypeError(f"a step must return a dataclass record, got {type(record).__name__}")
    kind = f"{type(record).__module__}:{type(record).__qualname__}"
    return json.dumps({"type": kind, "fields": dataclasses.asdict(record)}, indent=2, default=str) + "\n"


def record_from_json(text: str, where: str) -> Any:
    try:
        data = json.loads(text)
        module, _, name = data["type"].partition(":")
        cls = getattr(importlib.import_module(module), name)
        return cls(**data["fields"])
    except (ValueError, KeyError, TypeError, AttributeError, ImportError) as err:
        raise ValueError(f"{where}: not a readable step record ({type(err).__name__}: {err})") from None


# ---------------------------------------------------------------- the lock


@dataclass(frozen=True)
class LockSettings:
    heartbeat_s: float = float(os.environ.get("LOOPLM_LOCK_HEARTBEAT_S", "10"))
    expiry_s: float = float(os.environ.get("LOOPLM_LOCK_EXPIRY_S", "60"))  # a heartbeat older than this is dead
    wait_s: float = 24 * 3600.0  # how long to wait for a live holder before giving up


def _gone(holder: dict[str, Any]) -> bool:
    """Whether a lock holder on this host no longer runs (its pid is gone). Other hosts: only the heartbeat says."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: does the process exist?
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        return False
    return False


class StepLock:
    """`_LOCK` in the output folder: {owner, host, pid, heartbeat}; refreshed by a thread while held."""

    def __init__(self, storage: Storage, folder: str, settings: LockSettings):
        self.storage, self.path, self.settings = storage, storage.sub(folder, LOCK_FILE), settings
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _content(self) -> str:
        return json.dumps(
            {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
        )

    def holder(self) -> dict[str, Any] | None:
        text = self.storage.read_text(self.path)
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return {"owner": "?", "heartbeat": 0.0}  # a torn write: treat as stale

    def acquire(self, on_wait: Callable[[dict[str, Any]], None] | None = None) -> None:
        deadline = time.monotonic() + self.settings.wait_s
        while True:
            if self.storage.create_exclusive(self.path, self._content()):
                break
            holder = self.holder()
            if holder is None:
                continue  # released between our attempt and the read
            age = time.time() - float(holder.get("heartbeat", 0.0))
            if age > self.settings.expiry_s or _gone(holder):
                # The holder stopped beating (a killed driver), or its process on this host is gone (kill -9: no
                # need to wait out the heartbeat): take the lock over, then check we won.
                self.storage.delete(self.path)
                continue
            if time.monotonic() > deadline:
                raise LockHeldError(f"{self.path} is held by {holder.get('owner')} (heartbeat {age:.0f} s ago)")
            if on_wait is not None:
                on_wait(holder)
            time.sleep(min(self.settings.heartbeat_s, 5.0))
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat:{self.path}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            holder = self.holder()
            if holder is None or holder.get("owner") != self.owner:
                return  # taken over (we were presumed dead): stop beating; the new owner runs the step
            self.storage.write_text(self.path, self._content())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self.holder()
        if holder is not None and holder.get("owner") == self.owner:
            self.storage.delete(self.path)


# ---------------------------------------------------------------- one step, as a Ray task


@dataclass(frozen=True)
class StepTask:
    """Everything the task needs to run one step (pickled into the Ray task)."""

    step: Step
    folder: str  # the output folder under the root
    signature: dict[str, Any]
    storage: Storage
    lock: LockSettings
    fresh: bool  # forced: start from an empty folder
    tracking: dict[str, str] | None  # {"uri", "run_id", "name", "experiment"} of the pipeline run


@dataclass(frozen=True)
class StepResult:
    name: str
    record: Any
    folder: str
    seconds: float
    ran: bool  # False when another driver finished it while this one waited for the lock


def execute_step(task: StepTask, *upstream: StepResult) -> StepResult:
    """Run one step under its lock (the body of the Ray task); see the module docstring."""
    step, storage, folder = task.step, task.storage, task.folder
    started = time.perf_counter()
    lock = StepLock(storage, folder, task.lock)
    lock.acquire(on_wait=lambda h: print(f"[{step.name}] waiting for {h.get('owner')} to finish it", flush=True))
    try:
        record_text = storage.read_text(storage.sub(folder, RECORD_FILE))
        if storage.exists(storage.sub(folder, SUCCESS)) and record_text and not task.fresh:
            record = record_from_json(record_text, storage.sub(folder, RECORD_FILE))
            return StepResult(step.name, record, folder, time.perf_counter() - started, ran=False)
        local = storage.local_folder(folder)
        if task.fresh:
            storage.clear_folder(folder, keep=LOCK_FILE)
            if not storage.local:
                shutil.rmtree(local, ignore_errors=True)
        storage.delete(storage.sub(folder, SUCCESS))
        local.mkdir(parents=True, exist_ok=True)
        atomic_write_text(local / STEP_FILE, json.dumps(task.signature, indent=2) + "\n")
        inputs = {
            role: Upstream(up.name, up.record, storage.download(up.folder))
            for role, up in zip(sorted(step.inputs), upstream, strict=True)
        }
        context = StepContext(step.name, local, fresh=task.fresh)
        with _step_tracking(task, context):
            record = step.fn(step.config, inputs, context)
        atomic_write_text(local / RECORD_FILE, record_to_json(record))
        storage.upload(local, folder)
        storage.write_text(storage.sub(folder, SUCCESS), "")  # last: everything above is in place
        return StepResult(step.name, record, folder, time.perf_counter() - started, ran=True)
    finally:
        lock.release()


class _step_tracking:  # noqa: N801 (a context manager used like a function)
    """The step's nested MLflow run under the pipeline run, set on the context while the step runs."""

    def __init__(self, task: StepTask, context: StepContext):
        self.task, self.context, self.manager = task, context, None

    def __enter__(self) -> StepContext:
        if self.task.tracking is None:
            return self.context
        from looplm.infra.tracking import attached_run, step_run

        info = self.task.tracking
        parent = attached_run(info["uri"], info["run_id"], info["name"], experiment=info["experiment"])
        tags = {"looplm.output": self.task.folder, "looplm.step_hash": self.task.folder.rsplit("-", 1)[-1]}
        self.manager = step_run(parent, self.task.step.name, config=self.task.step.config, tags=tags)
        self.context.tracker = self.manager.__enter__()
        return self.context

    def __exit__(self, *exc: Any) -> bool:
        if self.manager is not None:
            return bool(self.manager.__exit__(*exc))
        return False


# ---------------------------------------------------------------- the driver


@dataclass(frozen=True)
class PlannedStep:
    step: Step
    hash: str
    folder: str
    action: str  # "run" | "skip"
    reasons: tuple[str, ...]  # why it runs (empty for a skip)
    fresh: bool = False  # forced, or downstream of a forced step: reruns from an empty folder


def plan(steps: Iterable[Step], storage: Storage, force: Iterable[str] = ()) -> list[PlannedStep]:
    """Each step (with everything upstream) as run or skip, and for each run why (see `explain`)."""
    order = topological(steps)
    names = {s.name for s in order}
    unknown = sorted(set(force) - names)
    if unknown:
        raise ValueError(f"--force {', '.join(unknown)}: no such step; steps are {', '.join(names)}")
    forced = downstream_of(force, order)
    hashes: dict[str, str] = {}
    planned: list[PlannedStep] = []
    for step in order:
        signature = step_signature(step, hashes)
        hashes[step.name] = digest(signature)
        folder = storage.join(f"{step.name}-{hashes[step.name]}")
        done = step.cacheable and storage.exists(storage.sub(folder, SUCCESS))
        reasons: list[str] = []
        if not step.cacheable:
            reasons.append("never cached (its result is a live service, not files)")
        elif step.name in forced:
            reasons.append("forced" if step.name in set(force) else "downstream of a forced step")
        elif not done:
            reasons.extend(explain(step.name, signature, folder, storage))
        action = "skip" if done and step.name not in forced else "run"
        fresh = step.name in forced or not step.cacheable
        planned.append(PlannedStep(step, hashes[step.name], folder, action, tuple(reasons), fresh))
    return planned


def explain(name: str, signature: dict[str, Any], folder: str, storage: Storage) -> list[str]:
    """Why a step without `_SUCCESS` runs: an unfinished earlier attempt, or what differs from the newest
    finished version of the step under the root (config fields by dotted name, inputs by upstream folder)."""
    if storage.exists(storage.sub(folder, STEP_FILE)):
        return ["an earlier run did not finish: resumes in its folder"]
    candidates = []
    for entry in storage.listdir(storage.root):
        if entry.startswith(f"{name}-") and storage.join(entry) != folder:
            marker = storage.join(entry, SUCCESS)
            if storage.exists(marker):
                candidates.append((storage.mtime(marker), entry))
    if not candidates:
        return ["no earlier output of this step"]
    _, entry = max(candidates)
    text = storage.read_text(storage.join(entry, STEP_FILE))
    if not text:
        return [f"{entry} has no {STEP_FILE} to compare with"]
    previous = json.loads(text)
    changes = [
        f"config {key}: {_short(old)} -> {_short(new)}"
        for key, old, new in diff(previous.get("config", {}), signature["config"])
    ]
    for role, upstream in signature["inputs"].items():
        before = previous.get("inputs", {}).get(role)
        if before != upstream:
            changes.append(f"input {role}: {before} -> {upstream}")
    for key in ("function", "version"):
        if previous.get(key) != signature[key]:
            changes.append(f"{key}: {previous.get(key)} -> {signature[key]}")
    return [f"changed since {entry}: {c}" for c in changes] or [f"differs from {entry}"]


def diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted field, old, new) for every leaf that differs; lists compare by index."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += diff(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for index, (a, b) in enumerate(zip(old, new, strict=True)):
            out += diff(a, b, f"{prefix}{index}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def load_record(storage: Storage, folder: str) -> Any:
    path = storage.sub(folder, RECORD_FILE)
    text = storage.read_text(path)
    if text is None:
        raise FileNotFoundError(f"{path} is missing: the step's folder is marked done but holds no record")
    return record_from_json(text, path)


def format_plan(planned: list[PlannedStep]) -> str:
    lines = []
    for p in planned:
        lines.append(f"{p.action:4}  {p.step.name:<16} {p.folder}")
        lines.extend(f"        {reason}" for reason in p.reasons)
    return "\n".join(lines)


def format_table(rows: list[tuple[str, str, str, str]]) -> str:
    header = ("step", "cached/run", "time", "output")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [f"{header[0]:<{widths[0]}}  {header[1]:<{widths[1]}}  {header[2]:>{widths[2]}}  {header[3]}"]
    for name, status, seconds, folder in rows:
        lines.append(f"{name:<{widths[0]}}  {status:<{widths[1]}}  {seconds:>{widths[2]}}  {folder}")
    return "\n".join(lines)


@dataclass
class PipelineResult:
    records: dict[str, Any]  # step name -> its record
    folders: dict[str, str]  # step name -> output folder
    table: list[tuple[str, str, str, str]]
    run_id: str | None = None  # the pipeline's MLflow run


def run_steps(
    steps: Iterable[Step],
    root: str | os.PathLike,
    *,
    force: Iterable[str] = (),
    pipeline_name: str = "pipeline",
    tracking_uri: str | None = None,
    experiment: str = "looplm",
    config: Any = None,
    ray_address: str | None = None,
    lock: LockSettings | None = None,
    filesystem: Any = None,
) -> PipelineResult:
    """Run what is not cached as one graph of Ray tasks (see the module docstring); prints the final table.

    Tracking: one MLflow run per call (`pipeline_name`, with `config` as params), a nested run per step that
    runs; cached steps are tagged on the parent. No tracking without a tracking_uri (or $MLFLOW_TRACKING_URI).
    Raises StepFailedError naming the first step that failed, after printing the table.
    """
    import ray

    from looplm.infra.ray_cluster import ray_session

    storage = Storage.at(root, filesystem)
    force = tuple(force)
    planned = plan(steps, storage, force)
    lock = lock or LockSettings()
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    records: dict[str, Any] = {}
    table: dict[str, tuple[str, str, str, str]] = {}
    for p in planned:
        if p.action == "skip":
            records[p.step.name] = load_record(storage, p.folder)
            table[p.step.name] = (p.step.name, "cached", "-", p.folder)
        else:
            table[p.step.name] = (p.step.name, "not run", "-", p.folder)
    print(format_plan(planned), flush=True)

    parent = None
    tracking = None
    if tracking_uri:
        from looplm.infra.tracking import RunLogger, code_version

        parent = RunLogger(tracking_uri, pipeline_name, experiment=experiment, tags=code_version())
        if config is not None:
            parent.log_params(config)
            parent.log_dict(config if isinstance(config, dict) else dataclasses.asdict(config), "config.json")
        parent.set_tags({f"looplm.cached.{p.step.name}": p.folder for p in planned if p.action == "skip"})
        if parent.flush() and parent.run_id:
            tracking = {"uri": tracking_uri, "run_id": parent.run_id, "name": pipeline_name, "experiment": experiment}
    status = "FAILED"
    failure: BaseException | None = None
    try:
        to_run = [p for p in planned if p.action == "run"]
        if to_run:
            env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")}
            # The dashboard (127.0.0.1) serves the State API that Ray Train's placement-group cleaner polls.
            with ray_session(ray_address, include_dashboard=True, runtime_env={"env_vars": env}):
                remote = ray.remote(max_retries=0)(execute_step)
                nodes: dict[str, Any] = {}
                folders = {p.step.name: p.folder for p in planned}
                for p in to_run:
                    args = []
                    for role in sorted(p.step.inputs):
                        up = p.step.inputs[role].name
                        # A cached input enters as a finished result; the task downloads it where it runs.
                        args.append(nodes[up] if up in nodes else StepResult(up, records[up], folders[up], 0.0, False))
                    task = StepTask(p.step, p.folder, step_signature(p.step, {q.step.name: q.hash for q in planned}),
                                    storage, lock, p.fresh, tracking)  # fmt: skip
                    # An upstream's ObjectRef as an argument is the graph's edge: Ray starts the task when it is ready.
                    options = {"num_cpus": p.step.num_cpus, "name": f"looplm-step:{p.step.name}"}
                    nodes[p.step.name] = remote.options(**options).remote(task, *args)
                refs = [nodes[p.step.name] for p in to_run]
                for p, ref in zip(to_run, refs, strict=True):
                    try:
                        result: StepResult = ray.get(ref)
                    except Exception as err:  # noqa: BLE001 (any task error: name the step, keep the table)
                        failure = err
                        failed = _first_failed(to_run, storage)
                        table[failed] = (failed, "FAILED", "-", table[failed][3])
                        break
                    records[p.step.name] = result.record
                    status_text = "run" if result.ran else "cached (by another driver)"
                    table[p.step.name] = (p.step.name, status_text, f"{result.seconds:.1f}s", p.folder)
        status = "FINISHED" if failure is None else "FAILED"
    finally:
        if parent is not None:
            parent.close(status)
        print(format_table([table[p.step.name] for p in planned]), flush=True)
    if failure is not None:
        failed = _first_failed([p for p in planned if p.action == "run"], storage)
        folder = table[failed][3]
        raise StepFailedError(
            f"step {failed!r} failed (output folder {folder}); fix the cause and rerun: finished steps are "
            f"skipped and {failed!r} resumes in its folder.\n{failure}"
        ) from failure
    return PipelineResult(
        records=records,
        folders={p.step.name: p.folder for p in planned},
        table=[table[p.step.name] for p in planned],
        run_id=tracking["run_id"] if tracking else None,
    )


def _first_failed(to_run: list[PlannedStep], storage: Storage) -> str:
    for p in to_run:
        if not storage.exists(storage.sub(p.folder, SUCCESS)):
            return p.step.name
    return to_run[-1].step.name


def status_rows(steps: Iterable[Step], root: str | os.PathLike, filesystem: Any = None) -> list[tuple[str, str, str]]:
    """(step, state, output folder) with state done, running (lock heartbeat age), unfinished or not run."""
    storage = Storage.at(root, filesystem)
    rows = []
    for p in plan(steps, storage):
        if storage.exists(storage.sub(p.folder, SUCCESS)):
            state = "done"
        elif (holder := StepLock(storage, p.folder, LockSettings()).holder()) is not None:
            age = time.time() - float(holder.get("heartbeat", 0.0))
            stale = " (stale: its driver is gone)" if age > LockSettings().expiry_s else ""
            state = f"running by {holder.get('owner')}, heartbeat {age:.0f} s ago{stale}"
        elif storage.exists(storage.sub(p.folder, STEP_FILE)):
            state = "unfinished (the next run resumes it)"
        else:
            state = "not run"
        rows.append((p.step.name, state, p.folder))
    return rows
