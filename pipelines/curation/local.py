"""Curation without Ray (`executor: local`): the part of Ray Data's `Dataset` that `curate._curate` uses, over pandas
frames in this process and a small pool of worker processes, the way datatrove has a LocalPipelineExecutor next to
its Ray and Slurm executors.

Why: on one machine Ray's fixed cost outweighs curation's own. A local Ray node runs about ten processes (GCS,
raylet, agents, dashboard), Ray Data adds two actors, and each of those and every worker imports `ray.data` (pandas
and pyarrow): ~1.1 GiB and ~24 s under load before the first document is read (BENCHMARKS.md). The stages here are
the same functions (`curation/stages.py`) called on the same pandas batches in the same order, so a run writes the
same outputs, byte for byte; only where the functions run differs.

Design:
- A dataset is a list of parts: a task (a read from `sources.read_tasks`: a function and its arguments) and the
  stages still to run on its rows (`map_batches`, lazy as in Ray Data). Running a dataset sends each part to the
  pool; the part reads its file or block and runs its stages one after another over batches of `batch_size` rows,
  as Ray Data fuses a read and the `map_batches` after it into one task. Results come back in part order (Ray
  Data's `preserve_order`).
- `materialize` keeps the frames in this process (Ray keeps them in its object store); the next pass sends them
  out again. A stage's arguments travel pickled with each part, as Ray deserialises `fn_args` in each task.
- The pool: `num_cpus` processes started by multiprocessing's forkserver, which imports the stage modules once
  before it forks the workers, so they share those pages (datatrove's workers fork from their parent the same
  way); not `fork` from this process, whose threads (pyarrow's, the tokenizer's) make forking it unsafe. One CPU:
  no pool, every part runs in this process.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

Task = tuple[Callable[..., Any], tuple]  # a function and its arguments; returns a frame, or an iterable of frames
Stage = tuple[Callable[..., pd.DataFrame], tuple, int | None]  # map_batches' function, fn_args and batch_size
Part = tuple[Task, tuple[Stage, ...]]
Runner = Callable[..., Iterator]  # `map`, or a pool's: results in the order of the inputs

# What the forkserver imports before it forks the workers: the modules whose functions the parts name.
WORKER_MODULES = ("looplm.pipelines.curation.stages", "looplm.pipelines.sources", __name__)


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity: a taskset's or cpuset's limit, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def worker_pool(num_cpus: int | None) -> Iterator[Runner]:
    """A runner over `num_cpus` worker processes (None: every CPU this process may use); with one, this process."""
    workers = num_cpus or cpu_count()
    if workers == 1:
        yield map
        return
    context = multiprocessing.get_context("forkserver")
    # Applies when this process starts its forkserver, i.e. on the first pool; a later pool reuses that server.
    context.set_forkserver_preload(list(WORKER_MODULES))
    pool = ProcessPoolExecutor(workers, mp_context=context)
    try:
        yield pool.map
    finally:  # on an error, the parts not yet started are dropped, not run to the end
        pool.shutdown(wait=True, cancel_futures=True)


class LocalDataset:
    """The methods of Ray Data's `Dataset` that curation calls, with the same meaning, over pandas frames."""

    def __init__(self, parts: list[Part], run: Runner, progress: bool = False) -> None:
        self.parts, self.run, self.progress = parts, run, progress

    @classmethod
    def read(cls, tasks: list[Task], run: Runner, progress: bool = False) -> LocalDataset:
        return cls([(task, ()) for task in tasks], run, progress)

    def _with(self, parts: list[Part]) -> LocalDataset:
        return LocalDataset(parts, self.run, self.progress)

    def union(self, *others: LocalDataset) -> LocalDataset:
        return self._with([part for dataset in (self, *others) for part in dataset.parts])

    def map_batches(
        self, fn: Callable[..., pd.DataFrame], *, fn_args: Iterable = (), batch_size: int | None = None,
        batch_format: str = "pandas",
    ) -> LocalDataset:  # fmt: skip
        if batch_format != "pandas":
            raise ValueError(f"the local executor runs pandas batches only, not batch_format={batch_format!r}")
        stage = (fn, tuple(fn_args), batch_size)
        return self._with([(task, (*stages, stage)) for task, stages in self.parts])

    def select_columns(self, columns: list[str]) -> LocalDataset:
        if self._materialized():  # a projection in this process: no round trip of the text through the pool
            return self._with([((_given, ([f[columns] for f in task[1][0]],)), ()) for task, _ in self.parts])
        return self.map_batches(_select, fn_args=(list(columns),))

    def materialize(self) -> LocalDataset:
        return self._with([((_given, (frames,)), ()) for frames in self._results()])

    def count(self) -> int:
        return sum(len(frame) for frames in self._results() for frame in frames)

    def to_pandas(self) -> pd.DataFrame:
        frames = [frame for part in self._results() for frame in part]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def iter_batches(self, batch_format: str = "pandas") -> Iterator[pd.DataFrame]:
        if batch_format != "pandas":
            raise ValueError(f"the local executor yields pandas batches only, not batch_format={batch_format!r}")
        for frames in self._results(bar=False):  # the caller shows its own progress (`curate.pack`)
            yield from frames

    def write_parquet(self, path: str) -> None:
        """One file per part that holds rows, named by the part's position (Ray names its files by a uuid)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        for _ in self._results([str(folder / f"part-{i:05d}.parquet") for i in range(len(self.parts))]):
            pass

    def _materialized(self) -> bool:
        return all(task[0] is _given and not stages for task, stages in self.parts)

    def _results(self, write_to: list[str] | None = None, bar: bool = True) -> Iterator[list[pd.DataFrame]]:
        """Each part's frames, in part order: from memory when nothing is left to run, else from the pool."""
        if self._materialized() and write_to is None:
            for task, _ in self.parts:
                yield task[1][0]
            return
        from tqdm import tqdm

        stages = self.parts[0][1] if self.parts else ()
        names = ["read" if self.parts and self.parts[0][0][0] is not _given else "", *(s[0].__name__ for s in stages)]
        desc = ", ".join(dict.fromkeys(name.removesuffix("_stage") for name in names if name))
        results = self.run(_run_part, self.parts, write_to or [None] * len(self.parts))
        with tqdm(total=len(self.parts), desc=desc, unit="part", disable=not (self.progress and bar)) as progress:
            for frames in results:
                progress.update(1)
                yield frames


def _run_part(part: Part, write_to: str | None) -> list[pd.DataFrame]:
    """A part's task, then its stages over batches of their batch size; with `write_to`, its rows written there as
    parquet (when it has any) instead of returned."""
    (fn, args), stages = part
    result = fn(*args)
    frames = [result] if isinstance(result, pd.DataFrame) else list(result)
    for stage, stage_args, batch_size in stages:
        frames = [stage(batch, *stage_args) for frame in frames for batch in _batches(frame, batch_size)]
    if write_to is None:
        return frames
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(frame):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), write_to)
    return []


def _batches(frame: pd.DataFrame, size: int | None) -> list[pd.DataFrame]:
    """The frame in batches of `size` rows, each indexed from 0 as a Ray Data batch is."""
    if size is None or len(frame) <= size:
        return [frame.reset_index(drop=True)]
    return [frame.iloc[i : i + size].reset_index(drop=True) for i in range(0, len(frame), size)]


def _given(frames: list[pd.DataFrame]) -> list[pd.DataFrame]:
    return frames


def _select(batch: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return batch[columns]
