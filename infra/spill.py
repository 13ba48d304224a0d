"""Runs the tracking server never received: kept on disk when a run ends during an outage, replayed when it is back.

    replayed = replay_spills("http://127.0.0.1:5000")     # what every tracking command does at start
    python -m looplm.infra.spill [URI] [--any-server]       # by hand (URI: $MLFLOW_TRACKING_URI by default)

A spill is one folder per run under `spill_dir()`: `run.jsonl` (a header line, then params and tags, one line per
metric, one per artifact) and `artifacts/`, copies of the run's artifact files made at spill time, since the
originals are often staged in the system temp folder, which may be gone by the time of the replay. The folder
is written under a temporary name and renamed when complete, so a crash mid-spill never leaves half a run to
replay. `spill_dir()` itself is under ~/.cache, not the temp folder, for the same reason.

Replay delivers each spill through a RunLogger, the same code path as live logging: into the run the server
already has when the run was created before the outage, else into a new run with the original name, start time,
tags and parent (a parent spilled too is replayed first, and its children are nested under it); metrics keep
their steps and timestamps; the run ends with the spilled status and end time. A new run's id is written back to
the spill before anything else is sent, so an interrupted replay resumes that run rather than making a second
one. A delivered spill is deleted. Each spill records the tracking URI it was meant for, and the automatic replay
delivers only those, so a test's server or a second store never receives another's runs; `--any-server` sends
the rest to the given server.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from looplm.infra.tracking import PARENT_TAG, SPILL_DIR_ENV, RunLogger

log = logging.getLogger(__name__)

RUN_FILE = "run.jsonl"


def spill_dir() -> Path:
    """$LOOPLM_TRACKING_SPILL_DIR, else $XDG_CACHE_HOME/looplm/tracking-spill (~/.cache by default)."""
    if os.environ.get(SPILL_DIR_ENV):
        return Path(os.environ[SPILL_DIR_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "looplm" / "tracking-spill"


# ---------------------------------------------------------------- writing


def write_spill(run: RunLogger, status: str) -> Path:
    """Everything `run` still holds, with copies of its artifacts, as `<spill_dir>/<run.spill_key>/run.jsonl`."""
    root = spill_dir()
    final = root / run.spill_key
    partial = root / f".{run.spill_key}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    artifacts: list[tuple[str, str | None]] = []
    for number, (local, folder) in enumerate(run._artifacts):
        source = Path(local)
        copy = partial / "artifacts" / str(number) / source.name
        copy.parent.mkdir(parents=True)
        try:
            if source.is_dir():
                shutil.copytree(source, copy)
            else:
                shutil.copy2(source, copy)
        except OSError as err:
            log.warning("run %s: artifact %s cannot be kept for replay (%s); it is left out", run.name, local, err)
            continue
        artifacts.append((copy.relative_to(partial).as_posix(), folder))
    parent = run.parent
    header = {
        "run_name": run.name,
        "run_id": run.run_id,
        "experiment": run.experiment,
        "status": status,
        "parent_run_id": parent.run_id if parent is not None else None,
        # A parent that never reached the server has no id yet: point at its spill, replayed before this one.
        "parent_spill": parent.spill_key if parent is not None and parent.run_id is None else None,
        "tracking_uri": run.tracking_uri,
        "start_ms": run.start_ms,
        "end_ms": int(time.time() * 1000),
    }
    lines = [{"run": header}, {"params": run._params, "tags": run._tags}]
    lines += [{"metric": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp} for m in run._metrics]
    lines += [{"artifact": path, "artifact_path": folder} for path, folder in artifacts]
    (partial / RUN_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    if final.exists():  # an earlier spill of this same run (a replay that failed again): this one has it all
        shutil.rmtree(final)
    partial.rename(final)
    shutil.rmtree(run._staging, ignore_errors=True)
    log.warning(
        "run %s: tracking server %s unreachable at the end; %d metrics, %d params and %d artifacts kept in %s. "
        "The next looplm command that tracks to %s sends them (or: python -m looplm.infra.spill %s)",
        run.name,
        run.tracking_uri,
        len(run._metrics),
        len(run._params),
        len(artifacts),
        final,
        run.tracking_uri,
        run.tracking_uri,
    )
    return final / RUN_FILE


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class Spill:
    path: Path  # its run.jsonl
    header: dict[str, Any]
    params: dict[str, str]
    tags: dict[str, str]
    metrics: list[Any]  # mlflow.entities.Metric
    artifacts: list[tuple[Path, str | None]]  # (file in the spill, artifact folder)

    @property
    def key(self) -> str:
        return self.path.parent.name


def read_spill(path: Path) -> Spill:
    """A spill's run.jsonl; a malformed one is an error naming the file and line."""
    from mlflow.entities import Metric

    header: dict[str, Any] | None = None
    params: dict[str, str] = {}
    tags: dict[str, str] = {}
    metrics, artifacts = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
            if "run" in record:
                header = record["run"]
            elif "params" in record:
                params, tags = record["params"], record["tags"]
            elif "metric" in record:
                metrics.append(Metric(record["metric"], record["value"], record["timestamp"], record["step"]))
            elif "artifact" in record:
                artifacts.append((path.parent / record["artifact"], record["artifact_path"]))
            else:
                raise ValueError(f"unknown record {sorted(record)}")
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not a spill record ({type(err).__name__}: {err})") from None
    if header is None:
        raise ValueError(f"{path}: no run header line")
    return Spill(path, header, params, tags, metrics, artifacts)


def pending_spills(folder: Path | None = None) -> list[Path]:
    """The run.jsonl of every complete spill in `folder` (default: spill_dir()), oldest first."""
    folder = folder or spill_dir()
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"*/{RUN_FILE}") if not p.parent.name.startswith(".")]
    return sorted(found, key=lambda p: p.stat().st_mtime)


# ---------------------------------------------------------------- replaying


@dataclass(frozen=True)
class ReplayedRun:
    name: str
    run_id: str
    status: str
    metrics: int
    params: int
    artifacts: int

    def __str__(self) -> str:
        return (
            f"{self.name} (run {self.run_id}, {self.status}): {self.metrics} metrics, {self.params} params, "
            f"{self.artifacts} artifacts"
        )


def replay_spills(tracking_uri: str, folder: Path | None = None, *, any_server: bool = False) -> list[ReplayedRun]:
    """Deliver the pending spills meant for `tracking_uri` (all of them with any_server) to it.

    Stops at the first spill the server does not take (it is down again: the rest wait for the next try); a
    spill that cannot be read is reported and left where it is."""
    spills = []
    for path in pending_spills(folder):
        try:
            spill = read_spill(path)
        except (OSError, ValueError) as err:
            log.warning("skipping a spill that cannot be read: %s", err)
            continue
        if any_server or spill.header.get("tracking_uri") == tracking_uri:
            spills.append(spill)
    # Parents first: a child spilled while its parent had no run id is nested under the parent's new run.
    spills.sort(key=lambda s: (s.header.get("parent_spill") is not None, s.header.get("start_ms", 0)))
    delivered: dict[str, str] = {}  # spill key -> run id
    replayed = []
    for spill in spills:
        parent_spill = spill.header.get("parent_spill")
        parent_waiting = parent_spill is not None and (spill.path.parents[1] / parent_spill).exists()
        if parent_waiting and parent_spill not in delivered:
            log.warning("spill %s waits for its parent's spill %s", spill.path, parent_spill)
            continue
        parent_id = spill.header.get("parent_run_id") or delivered.get(parent_spill)
        run_id = _deliver(spill, tracking_uri, parent_id)
        if run_id is None:
            break
        delivered[spill.key] = run_id
        for child in spills:  # so that a child left for a later replay still finds its parent's run
            if child.header.get("parent_spill") == spill.key and child.path.exists():
                _rewrite_header(child, {**child.header, "parent_run_id": run_id})
        replayed.append(
            ReplayedRun(
                spill.header["run_name"], run_id, spill.header["status"], len(spill.metrics), len(spill.params),
                len(spill.artifacts),
            )
        )  # fmt: skip
    return replayed


def _deliver(spill: Spill, tracking_uri: str, parent_id: str | None) -> str | None:
    """Send one spill through a RunLogger; its run id once delivered (and the spill deleted), None if not."""
    header = spill.header
    run = RunLogger(tracking_uri, header["run_name"], experiment=header["experiment"], flush_interval_s=float("inf"))
    run.run_id = header.get("run_id")
    run.start_ms = int(header.get("start_ms") or run.start_ms)
    run._tags = dict(spill.tags)
    if run.run_id is None and parent_id is not None:
        run._tags[PARENT_TAG] = parent_id
    try:
        if not run._reachable():
            return None
        if run.run_id is None:
            run._ensure_run()
            _rewrite_header(spill, {**header, "run_id": run.run_id})  # a retry resumes this run
        run._params = dict(spill.params)
        run._metrics = list(spill.metrics)
        run._artifacts = [(str(path), folder) for path, folder in spill.artifacts]
        if not run.flush():
            return None
        end_ms = int(header.get("end_ms") or time.time() * 1000)
        run.client.set_terminated(run.run_id, status=header["status"], end_time=end_ms)
    except Exception as err:  # noqa: BLE001 (the server refused it: keep the spill, say why)
        log.warning("spill %s not replayed into %s: %s: %s", spill.path, tracking_uri, type(err).__name__, err)
        return None
    finally:
        shutil.rmtree(run._staging, ignore_errors=True)
    shutil.rmtree(spill.path.parent)
    return run.run_id


def _rewrite_header(spill: Spill, header: dict[str, Any]) -> None:
    lines = spill.path.read_text().splitlines(keepends=True)
    lines[0] = json.dumps({"run": header}) + "\n"
    staged = spill.path.with_suffix(".tmp")
    staged.write_text("".join(lines))
    staged.replace(spill.path)


def report(replayed: list[ReplayedRun], tracking_uri: str) -> str | None:
    """What a command prints after replaying: one line per run delivered, and what still waits."""
    waiting = len(pending_spills())
    if not replayed and not waiting:
        return None
    lines = []
    if replayed:
        lines.append(f"sent {len(replayed)} run(s) that reached no tracking server before to {tracking_uri}:")
        lines += [f"  {run}" for run in replayed]
    if waiting:
        lines.append(
            f"{waiting} run(s) kept during a tracking outage still wait in {spill_dir()}; "
            f"send them to a server with: python -m looplm.infra.spill URI --any-server"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m looplm.infra.spill", description="Send runs kept during a tracking outage to MLflow."
    )
    parser.add_argument("uri", nargs="?", default=os.environ.get("MLFLOW_TRACKING_URI"), help="tracking URI")
    parser.add_argument("--any-server", action="store_true", help="also runs that were meant for another URI")
    args = parser.parse_args(argv)
    if not args.uri:
        parser.error("no tracking URI: pass one or set MLFLOW_TRACKING_URI")
    from looplm.infra.mlflow_server import is_healthy

    if args.uri.startswith(("http://", "https://")) and not is_healthy(args.uri):
        print(f"{args.uri} does not answer /health; nothing sent", file=sys.stderr)
        return 2
    replayed = replay_spills(args.uri, any_server=args.any_server)
    print(report(replayed, args.uri) or f"nothing waits in {spill_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
