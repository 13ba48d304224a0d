"""Data curation on Ray Data: raw documents in, Megatron indexed datasets and a curation report out.

    looplm curate configs/curate-demo.yaml [dotted.key=value ...] [--output DIR]

Stages, in order (FineWeb's, with NeMo Curator's PII and decontamination steps and Dolma's bookkeeping):

    read          sources -> one schema; bad input quarantined (malformed JSON, invalid UTF-8, missing text,
                  empty, binary, oversized)
    normalize     ftfy (mojibake, NFC), whitespace
    langid        fastText lid.176; keep the configured languages at or above the threshold (removals named
                  `langid`: another language, `langid_score`: a kept language below the threshold)
    quality       Gopher repetition, Gopher quality, C4, FineWeb rules (published thresholds)
    exact_dedup   content hash; one document per hash
    fuzzy_dedup   MinHash LSH (5-gram shingles, 14 bands x 8 rows), connected components, one per cluster
    pii           e-mail, IP and phone numbers replaced by tokens
    decontam      documents sharing a 13-gram with an evaluation set removed
    tokenize      byte-level BPE trained on the curated text, or a given tokenizer.json
    pack          Megatron .bin/.idx per source and split, and the mixture manifest

Per-document stages are `map_batches` over pandas batches that annotate rather than drop: a removed document
keeps its row with `removed_by` (the step) and `reason`, so every removal is counted and written out
(removed/*.parquet) with its reason. The two dedup steps compute hashes and MinHash band keys in parallel and
form clusters on the driver (FineWeb's clustering is a single task too). Output folder:

    tokenizer.json  mixture.json  megatron/<source>_{train,valid}.{bin,idx}  removed/  report/  config.yaml
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from looplm.infra.configs import load_config, to_dict
from looplm.pipelines.curation import report as reporting
from looplm.pipelines.curation.decontam import DecontamConfig, EvalIndex
from looplm.pipelines.curation.dedup import MinHashConfig, MinHasher, content_hash, fuzzy_duplicates
from looplm.pipelines.curation.langid import LangIdConfig, identify, language_verdict
from looplm.pipelines.curation.normalize import normalize_text
from looplm.pipelines.curation.pack import (
    IndexedWriter,
    PackConfig,
    TokenizerConfig,
    encode,
    prepare_tokenizer,
    split_of,
    token_dtype,
    write_manifest,
)
from looplm.pipelines.curation.pii import PIIConfig, redact
from looplm.pipelines.curation.quality import QUALITY_FILTERS, QUALITY_STEPS, QualityConfig
from looplm.pipelines.noise import NoiseConfig
from looplm.pipelines.sources import RAW_EXCERPT_CHARS, SourceConfig, SourceError, eval_questions, read_source

# Names a source's `skip` may use; "quality" and "dedup" stand for their groups.
SKIPPABLE = (
    "normalize",
    "langid",
    *QUALITY_STEPS,
    "exact_dedup",
    "fuzzy_dedup",
    "pii",
    "decontam",
)
SKIP_GROUPS = {
    "quality": QUALITY_STEPS,
    "dedup": ("exact_dedup", "fuzzy_dedup"),
}
EXCERPT_CHARS = 300


@dataclass(frozen=True)
class InputConfig:
    """Bad-input rules: documents past these are quarantined, not processed."""

    max_doc_chars: int = 1_000_000
    max_control_char_fraction: float = 0.01  # above this share of control characters a document is binary


def _default_sources() -> tuple[SourceConfig, ...]:
    # The embedded default: generated web-like pages with planted defects, plus the paper's synthetic tasks,
    # which are not web text: Gopher's repetition rules would remove templated facts and arithmetic, and made-up
    # names lower fastText's English score below FineWeb's 0.65.
    return (
        SourceConfig(name="bios", kind="bios", count=2000, noise=NoiseConfig(), weight=0.6),
        SourceConfig(name="multihop", kind="multihop", count=200, weight=0.3, skip=("langid", "quality")),
        SourceConfig(name="mano", kind="mano", count=200, weight=0.1, skip=("langid", "quality", "pii")),
    )


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
    builtin_eval: bool = True
    tokenizer: TokenizerConfig = TokenizerConfig()
    pack: PackConfig = PackConfig()
    batch_size: int = 512
    progress: bool = True
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a local Ray on loopback
    num_cpus: int | None = None  # local Ray only
    mlflow_tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else no MLflow logging

    def __post_init__(self) -> None:
        names = [s.name for s in self.sources]
        if not names:
            raise ValueError("curate: at least one source is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"curate: source names must be unique, got {names}")
        for source in self.sources:
            unknown = set(source.skip) - set(SKIPPABLE) - set(SKIP_GROUPS)
            if unknown:
                raise ValueError(f"source {source.name!r}: cannot skip {sorted(unknown)}; steps are {SKIPPABLE}")


def skip_table(sources: tuple[SourceConfig, ...]) -> dict[str, frozenset[str]]:
    """step -> the sources that skip it."""
    table: dict[str, set[str]] = {}
    for source in sources:
        for name in source.skip:
            for step in SKIP_GROUPS.get(name, (name,)):
                table.setdefault(step, set()).add(source.name)
    return {step: frozenset(names) for step, names in table.items()}


def _active(batch: pd.DataFrame, step: str, skips: dict[str, frozenset[str]]) -> np.ndarray:
    mask = (batch["removed_by"] == "").to_numpy().copy()
    if step in skips:
        mask &= ~batch["source"].isin(skips[step]).to_numpy()
    return mask


def _mark_modified(batch: pd.DataFrame, rows: list[int], step: str) -> None:
    column = batch.columns.get_loc("modified")
    for i in rows:
        current = batch.iat[i, column]
        batch.iat[i, column] = f"{current},{step}" if current else step


# --- per-document stages (pandas batch in, pandas batch out) ---------------------------------------------------


def input_problem(text: str, config: InputConfig) -> str:
    """Why a document is bad input, or ''."""
    if not text.strip():
        return "empty document"
    if len(text) > config.max_doc_chars:
        return f"document of {len(text)} chars > max_doc_chars {config.max_doc_chars}"
    if "\x00" in text:
        return "binary: contains NUL bytes"
    control = sum(1 for ch in text if ord(ch) < 32 and ch not in "\n\r\t")
    if control / len(text) > config.max_control_char_fraction:
        return f"binary: {control / len(text):.1%} control characters"
    return ""


def validate_stage(batch: pd.DataFrame, config: InputConfig) -> pd.DataFrame:
    batch = batch.copy()
    batch["n_chars"] = batch["text"].str.len().astype(np.int64)
    for column, empty in (("lang", ""), ("lang_score", 0.0), ("pii", ""), ("modified", "")):
        batch[column] = empty
    removed = batch["removed_by"].to_numpy().copy()
    reasons = batch["reason"].to_numpy().copy()
    texts = batch["text"].to_numpy().copy()
    for i in np.flatnonzero(removed == ""):
        problem = input_problem(texts[i], config)
        if problem:
            removed[i], reasons[i] = "read", problem
            texts[i] = texts[i][:RAW_EXCERPT_CHARS]
    batch["removed_by"], batch["reason"], batch["text"] = removed, reasons, texts
    return batch


def normalize_stage(batch: pd.DataFrame, skips: dict) -> pd.DataFrame:
    batch = batch.copy()
    changed = []
    texts = batch["text"].to_numpy().copy()
    for i in np.flatnonzero(_active(batch, "normalize", skips)):
        fixed = normalize_text(texts[i])
        if fixed != texts[i]:
            texts[i] = fixed
            changed.append(i)
    batch["text"] = texts
    _mark_modified(batch, changed, "normalize")
    return batch


def langid_stage(batch: pd.DataFrame, config: LangIdConfig, skips: dict) -> pd.DataFrame:
    batch = batch.copy()
    rows = np.flatnonzero(_active(batch, "langid", skips))
    if len(rows) == 0:
        return batch
    found = identify(batch["text"].to_numpy()[rows].tolist())
    lang_col, score_col = batch.columns.get_loc("lang"), batch.columns.get_loc("lang_score")
    removed_col, reason_col = batch.columns.get_loc("removed_by"), batch.columns.get_loc("reason")
    for i, (language, score) in zip(rows, found, strict=True):
        batch.iat[i, lang_col], batch.iat[i, score_col] = language, score
        step, reason = language_verdict(language, score, config)
        if step:
            batch.iat[i, removed_col], batch.iat[i, reason_col] = step, reason
    return batch


def quality_stage(batch: pd.DataFrame, config: QualityConfig, skips: dict) -> pd.DataFrame:
    batch = batch.copy()
    text_col, removed_col = batch.columns.get_loc("text"), batch.columns.get_loc("removed_by")
    reason_col = batch.columns.get_loc("reason")
    for step, check in QUALITY_FILTERS:
        changed = []
        for i in np.flatnonzero(_active(batch, step, skips)):
            text = batch.iat[i, text_col]
            reason, new_text = check(text, getattr(config, step))
            if reason:
                batch.iat[i, removed_col], batch.iat[i, reason_col] = step, reason
            elif new_text != text:
                batch.iat[i, text_col] = new_text
                changed.append(i)
        _mark_modified(batch, changed, step)
    return batch


def hash_stage(batch: pd.DataFrame, config: MinHashConfig, skips: dict) -> pd.DataFrame:
    """Adds content_hash (exact dedup) and band_keys (MinHash LSH, bytes) for the documents each step sees."""
    batch = batch.copy()
    hashes = np.full(len(batch), "", dtype=object)
    for i in np.flatnonzero(_active(batch, "exact_dedup", skips)):
        hashes[i] = content_hash(batch["text"].iat[i])
    keys = np.full(len(batch), b"", dtype=object)
    rows = np.flatnonzero(_active(batch, "fuzzy_dedup", skips))
    if len(rows):
        hasher = _minhasher(config)
        signatures, has_shingles = hasher.signatures(batch["text"].to_numpy()[rows].tolist())
        bands = hasher.band_keys(signatures)
        for j, i in enumerate(rows):
            if has_shingles[j]:
                keys[i] = bands[j].tobytes()
    batch["content_hash"], batch["band_keys"] = hashes, keys
    return batch


@functools.cache
def _minhasher(config: MinHashConfig) -> MinHasher:
    return MinHasher(config)


def mark_stage(batch: pd.DataFrame, removals: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """Apply removals decided on the driver ({key: (step, reason)}) and drop the dedup columns."""
    batch = batch.drop(columns=["content_hash", "band_keys"])
    removed_col, reason_col = batch.columns.get_loc("removed_by"), batch.columns.get_loc("reason")
    for i, key in enumerate(batch["key"]):
        if key in removals:
            batch.iat[i, removed_col], batch.iat[i, reason_col] = removals[key]
    return batch


def pii_stage(batch: pd.DataFrame, config: PIIConfig, skips: dict) -> pd.DataFrame:
    batch = batch.copy()
    text_col, pii_col = batch.columns.get_loc("text"), batch.columns.get_loc("pii")
    changed = []
    for i in np.flatnonzero(_active(batch, "pii", skips)):
        text, found = redact(batch.iat[i, text_col], config)
        batch.iat[i, pii_col] = json.dumps(found)
        if found:
            batch.iat[i, text_col] = text
            changed.append(i)
    _mark_modified(batch, changed, "pii")
    return batch


def decontam_stage(batch: pd.DataFrame, index: EvalIndex, skips: dict) -> pd.DataFrame:
    batch = batch.copy()
    text_col, removed_col = batch.columns.get_loc("text"), batch.columns.get_loc("removed_by")
    reason_col = batch.columns.get_loc("reason")
    for i in np.flatnonzero(_active(batch, "decontam", skips)):
        gram = index.first_match(batch.iat[i, text_col])
        if gram:
            batch.iat[i, removed_col] = "decontam"
            batch.iat[i, reason_col] = f"shares a {len(gram.split())}-gram with an evaluation text: {gram!r}"
    return batch


@functools.cache
def _tokenizer_from_json(serialized: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(serialized)


def tokenize_stage(batch: pd.DataFrame, tokenizer_json: str, eod: int) -> pd.DataFrame:
    """Token ids (with end of document) for kept documents; token counts for every readable document."""
    batch = batch.copy()
    tokenizer = _tokenizer_from_json(tokenizer_json)
    readable = np.flatnonzero((batch["removed_by"] != "read").to_numpy())
    encoded = encode(tokenizer, batch["text"].to_numpy()[readable].tolist(), eod) if len(readable) else []
    counts = np.zeros(len(batch), dtype=np.int64)
    tokens = [np.empty(0, dtype=np.int32)] * len(batch)
    kept = (batch["removed_by"] == "").to_numpy()
    for i, ids in zip(readable, encoded, strict=True):
        counts[i] = len(ids)
        if kept[i]:
            tokens[i] = ids
    batch["n_tokens"] = counts
    batch["tokens"] = tokens
    batch["excerpt"] = [t[:EXCERPT_CHARS] if not k else "" for t, k in zip(batch["text"], kept, strict=True)]
    return batch


# --- driver-side steps ---------------------------------------------------------------------------------------


def exact_duplicates(frame: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """{key: ('exact_dedup', reason)} for all but the smallest key of each content hash."""
    candidates = frame[(frame["removed_by"] == "") & (frame["content_hash"] != "")]
    removals = {}
    for _, group in candidates.groupby("content_hash"):
        if len(group) > 1:
            keys = sorted(group["key"])
            for key in keys[1:]:
                removals[key] = ("exact_dedup", f"same text as {keys[0]}")
    return removals


def near_duplicates(frame: pd.DataFrame, exclude: set[str], config: MinHashConfig) -> dict[str, tuple[str, str]]:
    candidates = frame[(frame["removed_by"] == "") & (frame["band_keys"].map(len) > 0)]
    candidates = candidates[~candidates["key"].isin(exclude)]
    if candidates.empty:
        return {}
    bands = np.frombuffer(b"".join(candidates["band_keys"]), dtype=np.uint64).reshape(len(candidates), -1)
    found = fuzzy_duplicates(candidates["key"].tolist(), bands)
    return {key: ("fuzzy_dedup", f"near-duplicate of {kept} (MinHash LSH cluster)") for key, kept in found.items()}


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


def _kept_rows(batch: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return batch.loc[batch["removed_by"] == "", columns]


def _removed_rows(batch: pd.DataFrame) -> pd.DataFrame:
    return batch.loc[batch["removed_by"] != "", ["key", "id", "source", "removed_by", "reason", "text", "meta"]]


def curate(config: CurateConfig, output: str | Path) -> dict:
    """Run every stage on the current Ray connection; returns the report (also written under output/report)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = context.execution_options.preserve_order, context.enable_progress_bars
    context.execution_options.preserve_order = True  # the same config gives the same .bin, byte for byte
    context.enable_progress_bars = config.progress
    try:
        return _curate(config, Path(output))
    finally:  # the driver's DataContext is shared with whatever runs next in this process
        context.execution_options.preserve_order, context.enable_progress_bars = saved


# What a run writes into its output folder; a rerun into the same folder clears these first, so no file of an
# earlier run (a removed/ part, a source's .bin that this run does not write) is mistaken for this run's.
OUTPUTS = ("_SUCCESS", "config.yaml", "tokenizer.json", "mixture.json", "megatron", "removed", "report")


def _curate(config: CurateConfig, output: Path) -> dict:
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

    parts = [read_source(source, config.seed) for source in config.sources]
    dataset = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    dataset = (
        dataset.map_batches(validate_stage, fn_args=(config.input,), **batch)
        .map_batches(normalize_stage, fn_args=(skips,), **batch)
        .map_batches(langid_stage, fn_args=(config.langid, skips), **batch)
        .map_batches(quality_stage, fn_args=(config.quality, skips), **batch)
        .map_batches(hash_stage, fn_args=(config.minhash, skips), **batch)
        .materialize()
    )
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
        .materialize()
    )
    lap("dedup marks, pii, decontam")

    kept_texts = (
        t
        for b in dataset.map_batches(_kept_rows, fn_args=(["text"],), **batch).iter_batches(batch_format="pandas")
        for t in b["text"]
    )
    tokenizer, added = prepare_tokenizer(
        config.tokenizer, itertools.islice(kept_texts, config.tokenizer.max_train_docs)
    )
    tokenizer.save(str(output / "tokenizer.json"))
    lap("tokenizer training")
    from looplm.model.tokenizer import END_OF_DOCUMENT  # here, not at the top: workers need not import torch

    eod = tokenizer.token_to_id(END_OF_DOCUMENT)
    dataset = dataset.map_batches(tokenize_stage, fn_args=(tokenizer.to_str(), eod), **batch).materialize()
    lap("tokenize")

    removed_dir = output / "removed"
    removed = dataset.map_batches(_removed_rows, **batch)
    if removed.count():
        removed.write_parquet(str(removed_dir))
    stats_columns = ["key", "id", "source", "planted", "removed_by", "reason", "meta", "n_chars", "n_tokens"]
    stats_columns += ["lang", "lang_score", "pii", "modified", "excerpt"]
    stats = dataset.select_columns(stats_columns).to_pandas()
    lap("write removed, collect stats")
    manifest = pack(dataset, stats, config, tokenizer, added, output)
    lap("pack")
    examples = {}
    for step, group in stats[stats["removed_by"] != ""].groupby("removed_by", sort=False):
        examples[step] = [
            {"id": row.key, "reason": row.reason, "text": row.excerpt} for row in group.head(3).itertuples()
        ]
    modified = Counter(step for steps in stats["modified"] if steps for step in steps.split(","))
    extra = {
        "modified": dict(modified),
        "seconds": round(time.perf_counter() - started, 1),
        "seconds_per_phase": phases,
        "tokenizer": {"vocab_size": manifest["vocab_size"], "special_tokens_added": added},
        "mixture": manifest["blend"],
    }
    report = reporting.build_report(stats, examples, extra)
    folder = reporting.write_report(output / "report", report, stats)
    tracking_uri = config.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking_uri:
        report["mlflow_run_id"] = reporting.log_to_mlflow(folder, report, config, tracking_uri)
    (output / "_SUCCESS").write_text("")
    return report


def pack(dataset, stats: pd.DataFrame, config: CurateConfig, tokenizer, added: list[str], output: Path) -> dict:
    """Write kept documents' tokens to megatron/<source>_{train,valid} in pipeline order; returns the manifest."""
    from tqdm import tqdm

    kept = stats[stats["removed_by"] == ""]
    valid = {k for k in kept["key"] if split_of(k, config.pack.valid_fraction, config.pack.split_seed) == "valid"}
    if config.pack.valid_fraction > 0:
        # Every source with two or more documents gets at least one validation document.
        for _, group in kept.groupby("source"):
            if len(group) >= 2 and not valid.intersection(group["key"]):
                valid.add(group["key"].iloc[-1])
    dtype = token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
    writers: dict[tuple[str, str], IndexedWriter] = {}
    documents = dataset.map_batches(
        _kept_rows, fn_args=(["key", "source", "tokens"],), batch_size=config.batch_size, batch_format="pandas"
    )
    with tqdm(total=len(kept), desc="pack", unit="doc", disable=not config.progress) as bar:
        for b in documents.iter_batches(batch_format="pandas"):
            for key, source, tokens in zip(b["key"], b["source"], b["tokens"], strict=True):
                split = "valid" if key in valid else "train"
                if (source, split) not in writers:
                    writers[(source, split)] = IndexedWriter(output / "megatron" / f"{source}_{split}", dtype)
                writers[(source, split)].add(np.asarray(tokens))
            bar.update(len(b))
    for writer in writers.values():
        writer.finalize()
    return write_manifest(output, writers, {s.name: s.weight for s in config.sources}, tokenizer, added)


def print_summary(report: dict) -> None:
    print(f"\ncuration: read {report['documents_read']} documents, kept {report['documents_kept']} "
          f"({report['tokens_kept']} tokens), quarantined {report['quarantined']}, "
          f"in {report['seconds']} s")  # fmt: skip
    print(f"{'step':<18}{'docs in':>10}{'removed':>10}{'docs out':>10}{'tokens out':>12}")
    for row in report["steps"]:
        print(
            f"{row['step']:<18}{row['docs_in']:>10}{row['docs_removed']:>10}{row['docs_out']:>10}{row['tokens_out']:>12}"
        )
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


def run(config: CurateConfig, output: str | Path) -> dict:
    """Connect to Ray (the configured or current cluster, else a local one), curate, print the summary."""
    from looplm.infra.ray_cluster import ray_session

    with ray_session(config.ray_address, num_cpus=config.num_cpus):
        report = curate(config, output)
    print_summary(report)
    print(f"output: {output}")
    return report


def load_curate_config(path: str | Path, overrides: list[str]) -> CurateConfig:
    """`load_config` (its overrides pick a source by position or name: sources.bios.count=100000)."""
    return load_config(CurateConfig, path, overrides)


def run_from_args(args) -> int:
    config = load_curate_config(args.config, args.overrides)
    digest = hashlib.blake2b(json.dumps(to_dict(config), sort_keys=True).encode(), digest_size=4).hexdigest()
    output = args.output or str(Path("runs") / f"curate-{digest}")
    run(config, output)
    return 0
