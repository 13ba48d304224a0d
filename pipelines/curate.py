"""Data curation on Ray Data, or in one process and a pool without Ray: raw documents in, Megatron indexed datasets
and a curation report out.

    looplm curate configs/curate-demo.yaml [dotted.key=value ...] [--output DIR]
    looplm curate configs/curate-demo.yaml executor=local          # one machine, no Ray

This module orchestrates; the stages live in `pipelines/curation/` (per-document stages in `stages.py`, the
filters and dedup in their own modules). Stages, in order (FineWeb's, with NeMo Curator's PII and
decontamination steps and Dolma's bookkeeping):

    read          sources -> one schema, one unique key per document; bad input quarantined (malformed JSON,
                  invalid UTF-8, missing text, empty, oversized)
    normalize     backspace overstrike resolved; binary documents quarantined; ftfy (mojibake, NFC), whitespace
    langid        fastText lid.176; keep the configured languages at or above the threshold (removals named
                  `langid`: another language, `langid_score`: a kept language below the threshold)
    quality       Gopher repetition, Gopher quality, C4, FineWeb rules (published thresholds)
    exact_dedup   content hash; one document per hash
    fuzzy_dedup   MinHash LSH (5-gram shingles, 14 bands x 8 rows), connected components, one per cluster
    pii           e-mail, IP and phone numbers replaced by tokens
    decontam      documents sharing a 13-gram with an evaluation set removed
    (checks)      a source that keeps nothing or too little fails the run or warns (`expect`); repeated ids
                  are reported
    tokenize      byte-level BPE trained on the curated text, or a given tokenizer.json; kept documents only
    pack          Megatron .bin/.idx per source and split, and the mixture manifest

Per-document stages are `map_batches` over pandas batches that annotate rather than drop: a removed document
keeps its row with `removed_by` (the step) and `reason`, so every removal is counted and written out
(removed/*.parquet) with its reason. The two dedup steps compute hashes and MinHash band keys in parallel and
form clusters on the driver (FineWeb's clustering is a single task too).

Two executors run the one stage sequence (`_curate`): `ray` (the default; a cluster, or corpora beyond one machine)
on Ray Data, and `local` on `curation/local.py`'s stand-in for the few Dataset methods `_curate` calls: the same
stage functions over the same pandas batches in this process and a pool of `num_cpus` processes, without Ray's
start-up and its processes' memory. Both write the same files, byte for byte, and the same report. Output folder:

    tokenizer.json  mixture.json  megatron/<source>_{train,valid}.{bin,idx}  removed/  report/  config.yaml

With `tokenize: false` (a curation-only run) the kept documents go to kept/*.parquet instead of the tokenizer,
manifest and megatron/ files.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from looplm.infra.configs import load_config, to_dict
from looplm.pipelines.curation import report as reporting
from looplm.pipelines.curation.checks import LowYieldError, YieldConfig, id_collisions, warn, yield_problems
from looplm.pipelines.curation.decontam import DecontamConfig, EvalIndex
from looplm.pipelines.curation.dedup import MinHashConfig, exact_duplicates, near_duplicates
from looplm.pipelines.curation.langid import LangIdConfig
from looplm.pipelines.curation.pack import (
    IndexedWriter,
    PackConfig,
    TokenizerConfig,
    prepare_tokenizer,
    split_of,
    token_dtype,
    write_manifest,
)
from looplm.pipelines.curation.pii import PIIConfig
from looplm.pipelines.curation.quality import QualityConfig
from looplm.pipelines.curation.stages import (
    SKIP_GROUPS,
    SKIPPABLE,
    InputConfig,
    decontam_stage,
    excerpt_stage,
    hash_stage,
    kept_rows,
    langid_stage,
    mark_stage,
    normalize_stage,
    pii_stage,
    quality_stage,
    removed_rows,
    skip_table,
    tokenize_stage,
    validate_stage,
)
from looplm.pipelines.noise import NoiseConfig
from looplm.pipelines.sources import SourceConfig, SourceError, check_source, eval_questions, read_source, read_tasks

__all__ = ["CurateConfig", "InputConfig", "curate", "run", "run_from_args", "load_curate_config", "check_inputs"]
__all__ += ["exact_duplicates", "near_duplicates", "skip_table"]  # kept importable from here


def _default_sources() -> tuple[SourceConfig, ...]:
    # The embedded default: generated web-like pages with planted defects, plus the paper's synthetic tasks,
    # which are not web text: Gopher's repetition rules would remove templated facts and arithmetic, and made-up
    # names lower fastText's English score below FineWeb's 0.65.
    return (
        SourceConfig(name="bios", kind="bios", count=2000, noise=NoiseConfig(), weight=0.6),
        SourceConfig(name="multihop", kind="multihop", count=200, weight=0.3, skip=("langid", "quality")),
        SourceConfig(name="mano", kind="mano", count=200, weight=0.1, skip=("langid", "quality", "pii")),
    )


EXECUTORS = ("ray", "local")


@dataclass(frozen=True)
class CurateConfig:
    sources: tuple[SourceConfig, ...] = field(default_factory=_default_sources)
    seed: int = 0  # the generators' seed
    input: InputConfig = InputConfig()
    langid: LangIdConfig = LangIdConfig()
    quality: QualityConfig = QualityConfig()
    minhash: MinHashConfig = MinHashConfig()
    pii: PIIConfig = PIIConfig()
    decontam: DecontamConfig = DecontamConfig()
    # Add the generated multi-hop world's held-out test questions (the evaluation step's task) to the eval set.
    # Off by default: a run on one's own data should not get synthetic questions in its decontamination set; the
    # demo config turns it on. The report says which evaluation texts were used.
    builtin_eval: bool = False
    expect: YieldConfig = YieldConfig()
    tokenize: bool = True  # false: a curation-only run, kept documents written to kept/*.parquet
    tokenizer: TokenizerConfig = TokenizerConfig()
    pack: PackConfig = PackConfig()
    batch_size: int = 512
    progress: bool = True
    # Where the stages run: "ray" (Ray Data: a cluster, or corpora beyond one machine) or "local" (this process and
    # a pool of num_cpus workers, no Ray: one machine, faster start, less memory). The outputs are the same.
    executor: str = "ray"
    ray_address: str | None = None  # executor ray: None is $RAY_ADDRESS, else a local Ray on loopback
    num_cpus: int | None = None  # a local Ray's CPUs, or the local executor's workers; None: every CPU
    mlflow_tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else no MLflow logging

    def __post_init__(self) -> None:
        names = [s.name for s in self.sources]
        if not names:
            raise ValueError("curate: at least one source is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"curate: source names must be unique, got {names}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"curate: executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.executor == "local" and self.ray_address is not None:
            raise ValueError(
                f"curate: ray_address={self.ray_address!r} with executor=local, which runs without Ray; "
                "drop ray_address, or use executor=ray"
            )
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"curate: num_cpus must be at least 1, got {self.num_cpus}")
        for source in self.sources:
            unknown = set(source.skip) - set(SKIPPABLE) - set(SKIP_GROUPS)
            if unknown:
                raise ValueError(f"source {source.name!r}: cannot skip {sorted(unknown)}; steps are {SKIPPABLE}")


def check_inputs(config: CurateConfig) -> None:
    """Every input file the run will read exists and can be read: checked before Ray starts (SourceError)."""
    for source in config.sources:
        check_source(source)
    for path in config.decontam.eval_files:
        if not Path(path).is_file():
            raise SourceError(f"decontam.eval_files: {path} does not exist")


def eval_texts(config: CurateConfig) -> list[str]:
    texts = []
    if config.builtin_eval:
        # The question sentence alone too: C4's line rules strip a short "Answer: X" line, leaving a 12-word
        # question that no 13-gram of question + answer matches; a text shorter than n counts whole.
        for qa in eval_questions(config.seed):
            texts += [qa.question.splitlines()[0], qa.text]
    for path in config.decontam.eval_files:
        file = Path(path)
        if not file.is_file():
            raise SourceError(f"decontam.eval_files: {file} does not exist")
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            if file.suffix in (".jsonl", ".json"):
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise SourceError(f"decontam.eval_files: {file}:{number} has no JSON text field ({err})") from err
            else:
                texts.append(line)
    return texts


def curate(config: CurateConfig, output: str | Path) -> dict:
    """Run every stage (executor ray: on the current Ray connection); returns the report (also written under
    output/report)."""
    check_inputs(config)
    stats, extra = (_on_local if config.executor == "local" else _on_ray)(config, Path(output))
    return _finish(config, Path(output), stats, extra)


def _on_ray(config: CurateConfig, output: Path) -> tuple[pd.DataFrame, dict]:
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = context.execution_options.preserve_order, context.enable_progress_bars
    context.execution_options.preserve_order = True  # the same config gives the same .bin, byte for byte
    context.enable_progress_bars = config.progress
    try:
        return _curate(config, output, read_source)
    finally:  # the driver's DataContext is shared with whatever runs next in this process
        context.execution_options.preserve_order, context.enable_progress_bars = saved


def _on_local(config: CurateConfig, output: Path) -> tuple[pd.DataFrame, dict]:
    """`_curate` on `LocalDataset`s: this process and a pool of `num_cpus` workers, stopped before the report."""
    from looplm.pipelines.curation.local import LocalDataset, worker_pool

    with worker_pool(config.num_cpus) as run:
        return _curate(
            config, output, lambda source, seed: LocalDataset.read(read_tasks(source, seed), run, config.progress)
        )


# What a run writes into its output folder; a rerun into the same folder clears these first, so no file of an
# earlier run (a removed/ part, a source's .bin that this run does not write) is mistaken for this run's.
OUTPUTS = ("_SUCCESS", "config.yaml", "tokenizer.json", "mixture.json", "megatron", "removed", "kept", "report")
STATS_COLUMNS = ["key", "id", "source", "planted", "removed_by", "reason", "meta", "n_chars"]
STATS_COLUMNS += ["lang", "lang_score", "pii", "modified", "excerpt"]


def _curate(config: CurateConfig, output: Path, read: Callable) -> tuple[pd.DataFrame, dict]:
    """Every stage but the report, on the datasets `read(source, seed)` returns (a Ray Dataset, or a LocalDataset,
    which has the same methods); returns the per-document stats and the report's other entries, for `_finish`."""
    import shutil

    started = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # _SUCCESS first: a run that fails from here on must not look finished
        path = output / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    (output / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    skips = skip_table(config.sources)
    batch = {"batch_size": config.batch_size, "batch_format": "pandas"}
    phases: dict[str, float] = {}
    last = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round(now - last[0], 2)
        last[0] = now

    parts = [read(source, config.seed) for source in config.sources]
    dataset = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    dataset = (
        dataset.map_batches(validate_stage, fn_args=(config.input,), **batch)
        .map_batches(normalize_stage, fn_args=(config.input, skips), **batch)
        .map_batches(langid_stage, fn_args=(config.langid, skips), **batch)
        .map_batches(quality_stage, fn_args=(config.quality, skips), **batch)
        .map_batches(hash_stage, fn_args=(config.minhash, skips), **batch)
        .materialize()
    )
    if dataset.count() == 0:  # an empty schema too: no column to select below
        names = ", ".join(f"{s.name} ({s.path or s.kind})" for s in config.sources)
        raise LowYieldError(f"curate read no documents from any source: {names}")
    lap("read, normalize, langid, quality, hashes")
    keys = dataset.select_columns(["key", "removed_by", "content_hash", "band_keys"]).to_pandas()
    removals = exact_duplicates(keys)
    removals.update(near_duplicates(keys, set(removals), config.minhash))
    del keys
    lap("dedup clustering (driver)")
    index = EvalIndex(eval_texts(config), config.decontam.n_gram)
    dataset = (
        dataset.map_batches(mark_stage, fn_args=(removals,), **batch)
        .map_batches(pii_stage, fn_args=(config.pii, skips), **batch)
        .map_batches(decontam_stage, fn_args=(index, skips), **batch)
        .map_batches(excerpt_stage, **batch)
        .materialize()
    )
    lap("dedup marks, pii, decontam")

    stats = dataset.select_columns(STATS_COLUMNS).to_pandas()
    if (stats["removed_by"] != "").any():  # counted from the stats: one pass over the dataset fewer
        dataset.map_batches(removed_rows, **batch).write_parquet(str(output / "removed"))
    stats["n_tokens"] = np.zeros(len(stats), dtype=np.int64)
    lap("write removed, collect stats")

    problems = yield_problems(stats, [s.name for s in config.sources], config.expect)
    collisions = id_collisions(stats)
    warnings = [f"{problem}" for problem in problems]
    for source, entry in collisions.items():
        warnings.append(
            f"source {source!r}: {entry['documents']} documents share {entry['ids']} ids (e.g. {entry['examples']}); "
            "each is kept as its own document (keys are file:line), but check id_field and the files"
        )
    failing = bool(problems) and config.expect.on_low_yield == "error"
    for message in warnings[len(problems) :] if failing else warnings:  # the error below says the problems once
        warn(message)
    extra = {
        "warnings": warnings,
        "id_collisions": collisions,
        "decontam": {
            "eval_texts": index.num_texts,
            "builtin_eval": config.builtin_eval,
            "eval_files": list(config.decontam.eval_files),
        },
        "tokenized": config.tokenize,
    }
    extra["low_yield"] = problems
    if failing:
        extra["seconds"], extra["seconds_per_phase"] = round(time.perf_counter() - started, 1), phases
        return stats, extra

    if config.tokenize:
        kept_texts = (
            t
            for b in dataset.map_batches(kept_rows, fn_args=(["text"],), **batch).iter_batches(batch_format="pandas")
            for t in b["text"]
        )
        tokenizer, added = prepare_tokenizer(
            config.tokenizer, itertools.islice(kept_texts, config.tokenizer.max_train_docs)
        )
        tokenizer.save(str(output / "tokenizer.json"))
        lap("tokenizer training")
        manifest, n_tokens = pack(dataset, stats, config, tokenizer, added, output)
        stats["n_tokens"] = stats["key"].map(n_tokens).fillna(0).astype(np.int64)
        lap("tokenize + pack")
        extra["tokenizer"] = {"vocab_size": manifest["vocab_size"], "special_tokens_added": added}
        extra["mixture"] = manifest["blend"]
    else:
        dataset.map_batches(kept_rows, fn_args=(["key", "id", "source", "text", "meta"],), **batch).write_parquet(
            str(output / "kept")
        )
        lap("write kept documents")
    extra["seconds"], extra["seconds_per_phase"] = round(time.perf_counter() - started, 1), phases
    return stats, extra


def _finish(config: CurateConfig, output: Path, stats: pd.DataFrame, extra: dict) -> dict:
    """The report (and MLflow), then `_SUCCESS`, or LowYieldError with the report written and nothing marked
    done. Needs no Ray: `run` calls it after its local Ray has stopped, so the report's plotting (matplotlib,
    ~30 MB) does not add to the peak memory while Ray's workers are alive."""
    problems = extra.pop("low_yield")
    report = _write_report(output, stats, extra, config)
    if problems and config.expect.on_low_yield == "error":
        raise LowYieldError(
            "; ".join(problems) + f". Nothing is marked done; see {output / 'report' / 'report.md'} and "
            f"{output / 'removed'} (expect.on_low_yield=warn finishes the run anyway)"
        )
    (output / "_SUCCESS").write_text("")
    return report


def _write_report(output: Path, stats: pd.DataFrame, extra: dict, config: CurateConfig) -> dict:
    examples = {}
    for step, group in stats[stats["removed_by"] != ""].groupby("removed_by", sort=False):
        examples[step] = [
            {"id": row.key, "reason": row.reason, "text": row.excerpt} for row in group.head(3).itertuples()
        ]
    modified = Counter(step for steps in stats["modified"] if steps for step in steps.split(","))
    report = reporting.build_report(stats, examples, {"modified": dict(modified), **extra})
    folder = reporting.write_report(output / "report", report, stats)
    tracking_uri = config.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking_uri:
        report["mlflow_run_id"] = reporting.log_to_mlflow(folder, report, config, tracking_uri)
    return report


def pack(
    dataset, stats: pd.DataFrame, config: CurateConfig, tokenizer, added: list[str], output: Path
) -> tuple[dict, dict[str, int]]:
    """Tokenize the kept documents and write them to megatron/<source>_{train,valid} in pipeline order; returns
    the manifest and each kept document's token count."""
    from tqdm import tqdm

    from looplm.model.tokenizer import END_OF_DOCUMENT  # here, not at the top: workers need not import torch

    kept = stats[stats["removed_by"] == ""]
    valid = {k for k in kept["key"] if split_of(k, config.pack.valid_fraction, config.pack.split_seed) == "valid"}
    if config.pack.valid_fraction > 0:
        # Every source with two or more documents gets at least one validation document.
        for _, group in kept.groupby("source"):
            if len(group) >= 2 and not valid.intersection(group["key"]):
                valid.add(group["key"].iloc[-1])
    dtype = token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
    writers: dict[tuple[str, str], IndexedWriter] = {}
    n_tokens: dict[str, int] = {}
    batch = {"batch_size": config.batch_size, "batch_format": "pandas"}
    eod = tokenizer.token_to_id(END_OF_DOCUMENT)
    documents = dataset.map_batches(kept_rows, fn_args=(["key", "source", "text"],), **batch).map_batches(
        tokenize_stage, fn_args=(tokenizer.to_str(), eod), **batch
    )
    with tqdm(total=len(kept), desc="tokenize + pack", unit="doc", disable=not config.progress) as bar:
        for b in documents.iter_batches(batch_format="pandas"):
            for key, source, tokens in zip(b["key"], b["source"], b["tokens"], strict=True):
                split = "valid" if key in valid else "train"
                if (source, split) not in writers:
                    writers[(source, split)] = IndexedWriter(output / "megatron" / f"{source}_{split}", dtype)
                writers[(source, split)].add(np.asarray(tokens))
                n_tokens[key] = len(tokens)
            bar.update(len(b))
    for writer in writers.values():
        writer.finalize()
    manifest = write_manifest(output, writers, {s.name: s.weight for s in config.sources}, tokenizer, added)
    return manifest, n_tokens


def print_summary(report: dict) -> None:
    print(f"\ncuration: read {report['documents_read']} documents, kept {report['documents_kept']} "
          f"({report['tokens_kept']} tokens), quarantined {report['quarantined']}, "
          f"in {report['seconds']} s")  # fmt: skip
    print(f"{'step':<18}{'docs in':>10}{'removed':>10}{'docs out':>10}{'chars out':>14}")
    for row in report["steps"]:
        print(
            f"{row['step']:<18}{row['docs_in']:>10}{row['docs_removed']:>10}{row['docs_out']:>10}{row['chars_out']:>14}"
        )
    decontam = report["decontam"]
    print(f"decontamination: {decontam['eval_texts']} evaluation texts (builtin_eval={decontam['builtin_eval']}, "
          f"eval_files={decontam['eval_files']})")  # fmt: skip
    for message in report["warnings"]:
        print(f"WARNING: {message}")
    planted = report["planted"]
    if not planted:
        return
    # precision*: other junk classes removed by the check set aside (see report.planted_scores)
    print(f"\n{'check':<14}{'defect':<18}{'planted':>8}{'caught':>8}{'recall':>8}{'any step':>10}{'precision':>11}"
          f"{'precision*':>11}")  # fmt: skip
    for check, entry in planted.items():
        if check == "pii":
            print(f"{'pii':<14}{'pii strings':<18}{entry['planted_strings']:>8}{entry['redacted_planted']:>8}"
                  f"{entry['recall']!s:>8}{'':>10}{entry['precision']!s:>11}")  # fmt: skip
            continue
        for defect, rec in entry["recall"].items():
            print(f"{check:<14}{defect:<18}{rec['planted']:>8}{rec['caught']:>8}{rec['recall']!s:>8}"
                  f"{rec['removed_by_any_step']!s:>10}{entry['precision']!s:>11}"
                  f"{entry['precision_excluding_other_junk']!s:>11}")  # fmt: skip
    for bucket in planted.get("fuzzy_dedup", {}).get("recall_by_edit_fraction", []):
        print(f"  near-duplicate recall, edit fraction {bucket['edit_fraction']}: {bucket['recall']} "
              f"of {bucket['planted']}")  # fmt: skip


# The environment of the processes a local Ray started by `run` starts (they inherit it from the driver at the
# start, the workers from the raylet); a variable the caller has set wins, and a cluster's own is not touched.
LOCAL_RAY_ENV = {
    # Ray starts its workers at nice 15, so that its own daemons stay responsive; on a machine shared with other
    # work that starves curation (one run slowed 11x as the load rose, where datatrove slowed 2x). Workers get the
    # caller's priority instead.
    "RAY_worker_niceness": "0",
    # Peak memory (BENCHMARKS.md): glibc gives each of a Ray process's many threads its own malloc arena, and
    # pyarrow's default pool (mimalloc) keeps what it freed; two arenas and the system allocator return memory
    # for reuse. Together about 60 MB less in the two workers at the peak on 4,000 real documents.
    "MALLOC_ARENA_MAX": "2",
    "ARROW_DEFAULT_MEMORY_POOL": "system",
}
# Under load a local raylet can take longer than Ray's fixed 30 s to register ("node timed out during startup"):
# the start is retried, as a person would.
STARTUP_ATTEMPTS = 3


@contextlib.contextmanager
def _ray(config: CurateConfig):
    from looplm.infra.ray_cluster import disconnect, ray_session

    added = {key: value for key, value in LOCAL_RAY_ENV.items() if key not in os.environ}
    os.environ.update(added)  # only while Ray starts: later subprocesses of this one get the caller's environment
    try:
        for attempt in range(1, STARTUP_ATTEMPTS + 1):
            session = ray_session(config.ray_address, num_cpus=config.num_cpus)
            try:
                session.__enter__()
            except Exception as err:  # Ray raises a bare Exception for this
                if "timed out during startup" not in str(err) or attempt == STARTUP_ATTEMPTS:
                    raise
                warn(f"Ray did not start (attempt {attempt} of {STARTUP_ATTEMPTS}): {err}; retrying")
                disconnect()
                continue
            break
    finally:
        for key in added:
            os.environ.pop(key, None)
    try:
        yield
    finally:
        session.__exit__(None, None, None)


def run(config: CurateConfig, output: str | Path) -> dict:
    """Curate (executor ray: on the configured or current cluster, else a local Ray), print the summary."""
    check_inputs(config)  # a missing file is named at once, not after Ray has started
    if config.executor == "local":
        stats, extra = _on_local(config, Path(output))
    else:
        with _ray(config):
            stats, extra = _on_ray(config, Path(output))
    report = _finish(config, Path(output), stats, extra)  # the report after Ray is down: see _finish
    print_summary(report)
    print(f"output: {output}")
    return report


def load_curate_config(path: str | Path, overrides: list[str]) -> CurateConfig:
    """`load_config` (its overrides pick a source by position or name: sources.bios.count=100000)."""
    return load_config(CurateConfig, path, overrides)


def run_from_args(args) -> int:
    from looplm.infra.mlflow_server import check_tracking_server

    config = load_curate_config(args.config, args.overrides)
    check_inputs(config)  # before the tracking check, which may replay spilled runs
    check_tracking_server(config.mlflow_tracking_uri)  # as train and eval: a dead server is refused before Ray
    digest = hashlib.blake2b(json.dumps(to_dict(config), sort_keys=True).encode(), digest_size=4).hexdigest()
    output = args.output or str(Path("runs") / f"curate-{digest}")
    run(config, output)  # SourceError, LowYieldError: user errors, one line and exit 2 from the CLI
    return 0
