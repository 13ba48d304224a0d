"""Heuristic quality filters with their published thresholds, in FineWeb's order: Gopher repetition, Gopher
quality, C4, FineWeb. Each rule reproduces a named reference exactly: datatrove 0.10.1's filters
(`datatrove/pipeline/filters/`), the code of the FineWeb pipeline (Penedo et al. 2024), which implements Gopher
(Rae et al. 2021, Table A1) and C4 (Raffel et al. 2020) with FineWeb's settings. The shared test set of real
documents (tests/pipelines/data/filters_real.jsonl, verdicts produced by datatrove) checks it.

Each filter is `fn(text, config) -> (reason, text)`: reason is '' when the document is kept; the text comes back
because the C4 filter removes lines (javascript and policy lines, lines of fewer than three words) in place.

Words and sentences are spaCy's English tokens and sentencizer, as datatrove splits them (`words.py`): "don't" is
two words ("do", "n't"), "--" and "..." are one token each, and with FineWeb's C4 settings (lines, not
paragraphs) every kept line is at least one sentence.

Where the references differ, the choice is an option (the test set checks each option against its reference):
- Gopher quality, the share of words with a letter (`alpha_words`): "gopher" (default) is the Gopher paper's rule
  ("80% of words in a document contain at least one alphabetic character", words being whitespace-separated:
  "1949." is one word without a letter, "end." one with); "fineweb" is the FineWeb pipeline's (datatrove's), whose
  words include punctuation tokens, so every "." or "," is a word without a letter. The FineWeb reading removes
  65% of the real English documents of the test set and 80% of the generated web pages (dates, commas); the
  paper's is the rule as published, and the default. Every other Gopher quality rule follows datatrove.
- FineWeb's line-ending punctuation (`fineweb.released`): true (default) is the code FineWeb was made with, where
  a line ending in a quote (" or ') ends in punctuation and the thresholds are inclusive (ratio <= 0.12 removes,
  short lines >= 0.67 removes, duplicate-line characters >= 0.01 removes); false is datatrove 0.10.1, which counts
  the terminal punctuation of many scripts but no quote, with strict thresholds.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from looplm.pipelines.curation.words import count_sentences, reference_rules, split_words

_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
PUNCTUATION = frozenset(reference_rules()["datatrove"]["punctuation"])  # datatrove's PUNCTUATION_SET
TERMINAL_PUNCTUATION = tuple(reference_rules()["datatrove"]["terminal_punctuation"])  # datatrove 0.10.1
END_PUNCTUATION = (".", "?", "!", '"', "'")  # C4's, and released FineWeb's line-ending punctuation
STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
ALPHA_WORDS = ("fineweb", "gopher")


@functools.lru_cache(maxsize=8)
def words_of(text: str) -> tuple[str, ...]:
    """spaCy's English words (punctuation tokens included), as datatrove's split_into_words; cached for the few
    latest texts, as datatrove caches it, since three filters read the words of one document."""
    return tuple(split_words(text))


@dataclass(frozen=True)
class GopherRepetitionConfig:
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))


@dataclass(frozen=True)
class GopherQualityConfig:
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3.0
    max_avg_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    max_non_alpha_words_ratio: float = 0.8  # (sic) the minimum fraction of words with an alphabetic character
    min_stop_words: int = 2
    alpha_words: str = "gopher"  # what a word is for that fraction: see the module docstring

    def __post_init__(self) -> None:
        if self.alpha_words not in ALPHA_WORDS:
            raise ValueError(f"gopher_quality.alpha_words must be one of {ALPHA_WORDS}, got {self.alpha_words!r}")


@dataclass(frozen=True)
class C4Config:
    """C4's rules; FineWeb turns off `filter_no_terminal_punct` (it removed too much), and so do we by default."""

    filter_no_terminal_punct: bool = False
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True
    remove_citations: bool = True


@dataclass(frozen=True)
class FineWebConfig:
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3
    released: bool = True  # the rules FineWeb was made with; false: datatrove 0.10.1's (see the module docstring)


@dataclass(frozen=True)
class QualityConfig:
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    c4: C4Config = C4Config()
    fineweb: FineWebConfig = FineWebConfig()


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of repeated items, characters in them), counting every occurrence after the first."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


class _Grams:
    """Word n-grams as uint64 hashes (a polynomial of per-document word ids), with their character lengths:
    the n-gram statistics below in numpy instead of joining strings, 4x faster; equal n-grams always hash
    equal, and a collision between different ones has probability about 2**-64 per pair."""

    _BASE = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, words: list[str]):
        ids: dict[str, int] = {}
        self.ids = np.fromiter((ids.setdefault(w, len(ids)) + 1 for w in words), np.uint64, len(words))
        self.char_ends = np.concatenate([[0], np.cumsum([len(w) for w in words])])
        self._hashes = {1: self.ids}

    def hashes(self, n: int) -> np.ndarray:
        """Hashes of the n-grams at each start, built from the longest shorter ones already computed."""
        if n not in self._hashes:
            below = max(k for k in self._hashes if k < n)
            h = self._hashes[below]
            with np.errstate(over="ignore"):
                for k in range(below + 1, n + 1):
                    count = len(self.ids) - k + 1
                    h = h[:count] * self._BASE + self.ids[k - 1 :] if count > 0 else np.zeros(0, dtype=np.uint64)
                    self._hashes[k] = h
        return self._hashes[n]

    def chars(self, start: int, n: int) -> int:
        """Characters of the n-gram at `start`, without separators."""
        return int(self.char_ends[start + n] - self.char_ends[start])


def _top_ngram_chars(grams: _Grams, n: int) -> int:
    """datatrove's find_top_duplicate: characters of the most frequent n-gram (space-joined) times its count;
    ties go to the n-gram seen first, as Counter.most_common does."""
    hashes = grams.hashes(n)
    if len(hashes) == 0:
        return 0
    _, first, counts = np.unique(hashes, return_index=True, return_counts=True)
    best = counts.max()
    start = int(first[counts == best].min())
    return (grams.chars(start, n) + n - 1) * int(best)


def _repeated_ngram_chars(grams: _Grams, n: int) -> int:
    """datatrove's find_all_duplicate: characters in n-grams seen before, skipping past each repeat so overlapping
    repeats count once."""
    hashes = grams.hashes(n)
    _, first = np.unique(hashes, return_index=True)
    candidates = np.ones(len(hashes), dtype=bool)
    candidates[first] = False  # an n-gram's first occurrence is never a repeat
    values = hashes.tolist()
    lengths = (grams.char_ends[n:] - grams.char_ends[:-n]).tolist()
    seen: set[int] = set()
    chars, i = 0, 0
    # datatrove's loop, visiting only the positions that may repeat: every position in between is a first
    # occurrence, so it is not in `seen` and the loop would add it and step on.
    for c in np.flatnonzero(candidates).tolist():
        if c < i:
            continue  # inside the n-gram just counted
        seen.update(values[i:c])
        if values[c] in seen:
            chars += lengths[c]
            i = c + n
        else:
            seen.add(values[c])
            i = c + 1
    return chars


def gopher_repetition(text: str, config: GopherRepetitionConfig) -> tuple[str, str]:
    if not text:
        return "gopher_repetition: empty", text
    paragraphs = _PARAGRAPHS.split(text.strip())
    dup, dup_chars = _duplicates(paragraphs)
    if dup / len(paragraphs) > config.dup_para_frac:
        return f"gopher_repetition: duplicate paragraphs {dup / len(paragraphs):.2f} > {config.dup_para_frac}", text
    if dup_chars / len(text) > config.dup_para_char_frac:
        ratio = dup_chars / len(text)
        return f"gopher_repetition: duplicate paragraph chars {ratio:.2f} > {config.dup_para_char_frac}", text
    lines = _LINES.split(text)
    dup, dup_chars = _duplicates(lines)
    if dup / len(lines) > config.dup_line_frac:
        return f"gopher_repetition: duplicate lines {dup / len(lines):.2f} > {config.dup_line_frac}", text
    if dup_chars / len(text) > config.dup_line_char_frac:
        ratio = dup_chars / len(text)
        return f"gopher_repetition: duplicate line chars {ratio:.2f} > {config.dup_line_char_frac}", text
    grams = _Grams(words_of(text))
    for n, limit in config.top_n_grams:
        ratio = _top_ngram_chars(grams, n) / len(text)
        if ratio > limit:
            return f"gopher_repetition: top {n}-gram chars {ratio:.2f} > {limit}", text
    for n, limit in sorted(config.dup_n_grams):
        hashes = grams.hashes(n)
        if len(np.unique(hashes)) == len(hashes):
            break  # no repeated n-gram, so no repeated longer one either
        ratio = _repeated_ngram_chars(grams, n) / len(text)
        if ratio > limit:
            return f"gopher_repetition: duplicated {n}-gram chars {ratio:.2f} > {limit}", text
    return "", text


def gopher_quality(text: str, config: GopherQualityConfig) -> tuple[str, str]:
    words = words_of(text)
    n = len(words)
    content = [w for w in words if any(ch not in PUNCTUATION for ch in w)]  # words that are not only symbols
    if len(content) < config.min_doc_words:
        return f"gopher_quality: {len(content)} words < {config.min_doc_words}", text
    if len(content) > config.max_doc_words:
        return f"gopher_quality: {len(content)} words > {config.max_doc_words}", text
    mean_length = sum(len(w) for w in content) / len(content)
    if mean_length < config.min_avg_word_length:
        return f"gopher_quality: mean word length {mean_length:.1f} < {config.min_avg_word_length}", text
    if mean_length > config.max_avg_word_length:
        return f"gopher_quality: mean word length {mean_length:.1f} > {config.max_avg_word_length}", text
    if text.count("#") / n > config.max_symbol_word_ratio:
        return f"gopher_quality: hash-to-word ratio {text.count('#') / n:.2f} > {config.max_symbol_word_ratio}", text
    ellipses = text.count("...") + text.count("…")
    if ellipses / n > config.max_symbol_word_ratio:
        return f"gopher_quality: ellipsis-to-word ratio {ellipses / n:.2f} > {config.max_symbol_word_ratio}", text
    lines = text.splitlines() or [text]
    bullets = sum(line.lstrip().startswith(("•", "-")) for line in lines) / len(lines)
    if bullets > config.max_bullet_lines_ratio:
        return f"gopher_quality: bullet lines {bullets:.2f} > {config.max_bullet_lines_ratio}", text
    trailing = sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines)
    if trailing > config.max_ellipsis_lines_ratio:
        return f"gopher_quality: lines ending in ellipsis {trailing:.2f} > {config.max_ellipsis_lines_ratio}", text
    alpha_over = words if config.alpha_words == "fineweb" else text.split()
    alpha = sum(any(ch.isalpha() for ch in w) for w in alpha_over) / len(alpha_over)
    if alpha < config.max_non_alpha_words_ratio:
        return f"gopher_quality: words with a letter {alpha:.2f} < {config.max_non_alpha_words_ratio}", text
    # Distinct stop words, as written (datatrove: the set of stop words among the words).
    stop_words = len(STOP_WORDS.intersection(words))
    if stop_words < config.min_stop_words:
        return f"gopher_quality: {stop_words} stop words < {config.min_stop_words}", text
    return "", text


def c4(text: str, config: C4Config) -> tuple[str, str]:
    """C4's line rules with FineWeb's settings (datatrove's C4QualityFilter, split_paragraph=True): a line's
    sentences are spaCy's sentencizer's, so every kept line is at least one sentence."""
    kept = []
    sentences = 0
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        words = line.split()
        if config.max_word_length > 0 and any(len(w) > config.max_word_length for w in words):
            continue
        if config.remove_citations:
            line = _CITATION.sub("", line)
        if config.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
            continue
        if len(words) < config.min_words_per_line:
            continue
        lowered = line.lower()
        if config.filter_lorem_ipsum and "lorem ipsum" in lowered:
            return "c4: lorem ipsum", text
        if config.filter_javascript and "javascript" in lowered:
            continue
        if config.filter_curly_bracket and "{" in line:
            return "c4: curly bracket", text
        if config.filter_policy and any(p in lowered for p in POLICY_SUBSTRINGS):
            continue
        if config.min_num_sentences > 0:
            sentences += count_sentences(line)
        kept.append(line)
    if sentences < config.min_num_sentences:
        return f"c4: {sentences} sentences < {config.min_num_sentences}", text
    # Keep paragraph breaks where C4 removed nothing, so later steps see the document's structure.
    return "", text if len(kept) == len(lines) else "\n".join(kept).strip()


def fineweb(text: str, config: FineWebConfig) -> tuple[str, str]:
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return "fineweb: empty", text
    released = config.released
    punct = sum(line.endswith(END_PUNCTUATION if released else TERMINAL_PUNCTUATION) for line in lines) / len(lines)
    too_few = punct <= config.line_punct_thr if released else punct < config.line_punct_thr
    if too_few and not (punct == 0 and config.line_punct_exclude_zero):
        sign = "<=" if released else "<"
        return f"fineweb: lines ending in punctuation {punct:.2f} {sign} {config.line_punct_thr}", text
    short = sum(len(line) <= config.short_line_length for line in lines) / len(lines)
    if short >= config.short_line_thr if released else short > config.short_line_thr:
        return f"fineweb: short lines {short:.2f} {'>=' if released else '>'} {config.short_line_thr}", text
    dup_chars = _duplicates(lines)[1] / max(1, len(text.replace("\n", "")))
    if dup_chars >= config.char_duplicates_ratio if released else dup_chars > config.char_duplicates_ratio:
        sign = ">=" if released else ">"
        return f"fineweb: duplicate line chars {dup_chars:.3f} {sign} {config.char_duplicates_ratio}", text
    newlines = text.count("\n") / max(1, len(words_of(text)))
    if newlines > config.new_line_ratio:
        return f"fineweb: newlines per word {newlines:.2f} > {config.new_line_ratio}", text
    return "", text


QUALITY_FILTERS = (
    ("gopher_repetition", gopher_repetition),
    ("gopher_quality", gopher_quality),
    ("c4", c4),
    ("fineweb", fineweb),
)
QUALITY_STEPS = tuple(step for step, _ in QUALITY_FILTERS)


class Verdict(NamedTuple):
    step: str  # the filter that removes the document, or ''
    reason: str
    text: str  # the text after the filters that ran (C4 removes lines in place)
    modified_by: tuple[str, ...]  # the filters that changed the text


def quality_verdict(text: str, config: QualityConfig, skip: frozenset[str] = frozenset()) -> Verdict:
    """The quality filter chain, in FineWeb's order, minus the `skip`ped filters: the first filter that removes
    the document, or step '' if all keep it. The pipeline's quality stage runs exactly this."""
    modified = []
    for step, check in QUALITY_FILTERS:
        if step in skip:
            continue
        reason, new_text = check(text, getattr(config, step))
        if reason:
            return Verdict(step, reason, text, tuple(modified))
        if new_text != text:
            modified.append(step)
            text = new_text
    return Verdict("", "", text, tuple(modified))
