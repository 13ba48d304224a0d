"""The per-document stages of curation: pandas batch in, pandas batch out, run by Ray Data's `map_batches`.

A stage annotates rather than drops: a removed document keeps its row with `removed_by` (the step) and `reason`,
so every removal is counted and written out with its reason. A source may skip any step (`SourceConfig.skip`);
`skip_table` turns those into step -> sources, and `_active` is the mask of rows a step works on.

Bad input is judged in two places: `validate_stage` (empty, oversized) before any text work, and the binary test
inside `normalize_stage`, after backspace overstrike is resolved (`normalize.resolve_overstrike`), so a man page
or fortune printed with `X\\bX` bold is cleaned, not quarantined as binary. ftfy runs after the binary test: it
deletes control characters, which would otherwise hide a binary file's bytes from the test.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from looplm.pipelines.curation.decontam import EvalIndex
from looplm.pipelines.curation.dedup import MinHashConfig, MinHasher, content_hash
from looplm.pipelines.curation.langid import LangIdConfig, identify, language_verdict
from looplm.pipelines.curation.normalize import normalize_text, resolve_overstrike
from looplm.pipelines.curation.pii import PIIConfig, redact
from looplm.pipelines.curation.quality import QUALITY_STEPS, QualityConfig, quality_verdict
from looplm.pipelines.sources import RAW_EXCERPT_CHARS

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


def skip_table(sources) -> dict[str, frozenset[str]]:
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


def size_problem(text: str, config: InputConfig) -> str:
    """Why a document is not worth reading (empty, oversized), or ''."""
    if not text.strip():
        return "empty document"
    if len(text) > config.max_doc_chars:
        return f"document of {len(text)} chars > max_doc_chars {config.max_doc_chars}"
    return ""


def binary_problem(text: str, config: InputConfig) -> str:
    """Why a document is binary (NUL bytes, too many control characters), or ''. Run after overstrike is
    resolved: a backspace that overstrikes a character is formatting, not binary."""
    if "\x00" in text:
        return "binary: contains NUL bytes"
    control = sum(1 for ch in text if ord(ch) < 32 and ch not in "\n\r\t")
    if control / max(1, len(text)) > config.max_control_char_fraction:
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
        problem = size_problem(texts[i], config)
        if problem:
            removed[i], reasons[i] = "read", problem
            texts[i] = texts[i][:RAW_EXCERPT_CHARS]
    batch["removed_by"], batch["reason"], batch["text"] = removed, reasons, texts
    return batch


def normalize_stage(batch: pd.DataFrame, config: InputConfig, skips: dict) -> pd.DataFrame:
    """Overstrike resolved, the binary test, then ftfy and whitespace (unless the source skips normalize)."""
    batch = batch.copy()
    texts = batch["text"].to_numpy().copy()
    removed = batch["removed_by"].to_numpy().copy()
    reasons = batch["reason"].to_numpy().copy()
    normalize = _active(batch, "normalize", skips)
    changed = []
    for i in np.flatnonzero(removed == ""):
        text = resolve_overstrike(texts[i])
        problem = binary_problem(text, config)
        if problem:
            removed[i], reasons[i] = "read", problem
            texts[i] = texts[i][:RAW_EXCERPT_CHARS]
            continue
        if normalize[i]:
            text = normalize_text(text)
        if text != texts[i]:
            texts[i] = text
            changed.append(i)
    batch["text"], batch["removed_by"], batch["reason"] = texts, removed, reasons
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
    """`quality.quality_verdict` (the one filter chain) on every kept document, minus its source's skipped
    filters."""
    batch = batch.copy()
    text_col, removed_col = batch.columns.get_loc("text"), batch.columns.get_loc("removed_by")
    reason_col, modified_col = batch.columns.get_loc("reason"), batch.columns.get_loc("modified")
    skipped_by_source: dict[str, frozenset[str]] = {}
    for step in QUALITY_STEPS:
        for source in skips.get(step, ()):
            skipped_by_source[source] = skipped_by_source.get(source, frozenset()) | {step}
    sources = batch["source"].to_numpy()
    for i in np.flatnonzero((batch["removed_by"] == "").to_numpy()):
        skip = skipped_by_source.get(sources[i], frozenset())
        if len(skip) == len(QUALITY_STEPS):
            continue
        verdict = quality_verdict(batch.iat[i, text_col], config, skip)
        if verdict.step:
            batch.iat[i, removed_col], batch.iat[i, reason_col] = verdict.step, verdict.reason
        elif verdict.modified_by:
            batch.iat[i, text_col] = verdict.text
            current = batch.iat[i, modified_col]
            batch.iat[i, modified_col] = ",".join(filter(None, [current, *verdict.modified_by]))
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


def excerpt_stage(batch: pd.DataFrame) -> pd.DataFrame:
    """The report's excerpt of each removed document."""
    batch = batch.copy()
    kept = (batch["removed_by"] == "").to_numpy()
    batch["excerpt"] = [t[:EXCERPT_CHARS] if not k else "" for t, k in zip(batch["text"], kept, strict=True)]
    return batch


@functools.cache
def _tokenizer_from_json(serialized: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(serialized)


def tokenize_stage(batch: pd.DataFrame, tokenizer_json: str, eod: int) -> pd.DataFrame:
    """Token ids (with end of document) of the kept documents only: a batch holds nothing else."""
    from looplm.pipelines.curation.pack import encode

    tokenizer = _tokenizer_from_json(tokenizer_json)
    texts = batch["text"].tolist()
    tokens = encode(tokenizer, texts, eod) if texts else []
    return pd.DataFrame(
        {"key": batch["key"].to_numpy(), "source": batch["source"].to_numpy(), "tokens": tokens,
         "n_tokens": np.array([len(t) for t in tokens], dtype=np.int64)}
    )  # fmt: skip


def kept_rows(batch: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return batch.loc[batch["removed_by"] == "", columns]


def removed_rows(batch: pd.DataFrame) -> pd.DataFrame:
    return batch.loc[batch["removed_by"] != "", ["key", "id", "source", "removed_by", "reason", "text", "meta"]]
