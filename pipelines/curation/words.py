"""Words and sentences as FineWeb's pipeline splits them: spaCy's English tokenizer and sentencizer.

datatrove (the reference implementation of the FineWeb rules) splits English text with `spacy.blank("en")`: the
text is cut at whitespace, then each piece loses prefixes and suffixes (punctuation, clitics such as "n't" and
"'s") and is split at infixes (hyphens between letters, "..." and so on), with a table of special cases ("don't"
-> "do" "n't", "e.g." whole, emoticons). Sentences are spaCy's sentencizer: a new sentence starts at the first
non-punctuation token after a token in its list of sentence-final characters, so a line without one is one
sentence. This module is that algorithm (spaCy's `Tokenizer._split_affixes`, `_attach_tokens`,
`Sentencizer.predict`) in Python on spaCy's rules exported as data (`reference_rules.json`, written by
bench/export_reference_rules.py): the same words without spaCy at run time, and about 20x faster, because a
piece of letters only that is no special case (most words) is a word at once, and pieces are cached.

Not reproduced: spaCy's second pass that merges special cases spanning affix splits (emoticons such as ":)"
followed by punctuation). The filter test set (tests/pipelines/data/filters_real.jsonl) measures what remains.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from importlib.resources import files


@functools.cache
def reference_rules() -> dict:
    """reference_rules.json: spaCy's English tokenizer rules and datatrove's punctuation sets."""
    return json.loads(files("looplm.pipelines.curation").joinpath("reference_rules.json").read_text("utf-8"))


@functools.cache
def _rules():
    data = reference_rules()["spacy"]
    # Every prefix alternative is anchored at the start and every suffix one at the end: `match` tries the start
    # only, and the suffix search looks at a piece's last SUFFIX_WINDOW characters only (spaCy's longest English
    # suffix, lookbehind included, is far shorter), instead of trying thousands of alternatives at every position.
    suffix = re.compile(data["suffix"]).search
    return (
        re.compile(data["prefix"]).match,
        lambda string: suffix(string[-SUFFIX_WINDOW:]),
        re.compile(data["infix"]).finditer,
        re.compile(data["url"]).match,
        {key: tuple(pieces) for key, pieces in data["special_cases"].items()},
        frozenset(data["sentence_punct_chars"]),
        # Special cases that hold punctuation, which the affix rules split apart and spaCy's second pass
        # (Tokenizer._apply_special_cases) joins again: emoticons, "''".
        frozenset(k for k in data["special_cases"] if not k.isalnum() and not k.isspace()),
    )


SUFFIX_WINDOW = 24
_CACHE: dict[str, tuple[str, ...]] = {}  # piece -> tokens: words repeat (spaCy keeps such a cache too)
_CACHE_LIMIT = 200_000


def _tokens(piece: str) -> tuple[str, ...]:
    tokens = _CACHE.get(piece)
    if tokens is None:
        if len(_CACHE) > _CACHE_LIMIT:
            _CACHE.clear()
        tokens = _CACHE[piece] = tuple(_merge_specials(_split(piece)))
    return tokens


def _merge_specials(tokens: list[str]) -> list[str]:
    """spaCy's second pass: runs of tokens that spell a special case holding punctuation become that case."""
    if len(tokens) < 2:
        return tokens
    specials, mergeable = _rules()[4], _rules()[6]
    out: list[str] = []
    i = 0
    while i < len(tokens):
        for j in range(min(len(tokens), i + 4), i + 1, -1):
            joined = "".join(tokens[i:j])
            if joined in mergeable:
                out.extend(specials[joined])
                i = j
                break
        else:
            out.append(tokens[i])
            i += 1
    return out


def _split(piece: str) -> list[str]:
    """The tokens of one whitespace-free piece of text."""
    prefix_search, suffix_search, infix_finditer, url_match, specials, _, _ = _rules()
    if piece in specials:
        return list(specials[piece])
    prefixes: list[str] = []
    suffixes: list[str] = []
    string = piece
    last_size = 0
    while string and len(string) != last_size:  # spaCy's Tokenizer._split_affixes
        if string in specials:
            break
        last_size = len(string)
        match = prefix_search(string)
        pre_len = match.end() if match else 0
        if pre_len:
            prefix, minus_pre = string[:pre_len], string[pre_len:]
            if minus_pre and minus_pre in specials:
                string = minus_pre
                prefixes.append(prefix)
                break
        match = suffix_search(string[pre_len:])
        suf_len = len(match.group()) if match else 0
        if suf_len:
            suffix, minus_suf = string[-suf_len:], string[:-suf_len]
            if minus_suf and minus_suf in specials:
                string = minus_suf
                suffixes.append(suffix)
                break
        if pre_len and suf_len and pre_len + suf_len <= len(string):
            string = string[pre_len:-suf_len]
            prefixes.append(prefix)
            suffixes.append(suffix)
        elif pre_len:
            string = minus_pre
            prefixes.append(prefix)
        elif suf_len:
            string = minus_suf
            suffixes.append(suffix)
    tokens = prefixes
    if string:  # spaCy's Tokenizer._attach_tokens
        if string in specials:
            tokens.extend(specials[string])
        elif url_match(string):
            tokens.append(string)
        else:
            start = 0
            for match in infix_finditer(string):
                infix_start, infix_end = match.start(), match.end()
                if infix_start == 0:
                    continue
                if infix_start != start:
                    tokens.append(string[start:infix_start])
                if infix_start != infix_end:
                    tokens.append(string[infix_start:infix_end])
                start = infix_end
            if string[start:]:
                tokens.append(string[start:])
    tokens.extend(reversed(suffixes))
    return tokens


def split_words(text: str) -> list[str]:
    """spaCy's English tokens of `text`, whitespace tokens left out (as datatrove's `split_into_words`)."""
    specials = _rules()[4]
    words: list[str] = []
    for piece in text.split():
        if piece.isalpha() and piece not in specials:
            words.append(piece)
        else:
            words.extend(t for t in _tokens(piece) if t.strip())
    return words


def _is_punct(token: str) -> bool:
    return all(unicodedata.category(ch).startswith("P") for ch in token)


def count_sentences(text: str) -> int:
    """spaCy's sentencizer on `text` (at least 1 for any text with a token, as datatrove's split_into_sentences)."""
    punct_chars = _rules()[5]
    sentences, seen_period, tokens = 1, False, 0
    for piece in re.split(r"(\s+)", text):
        if not piece:
            continue
        if piece.isspace():
            # A run of whitespace is a token to spaCy (not punctuation: it ends a pending sentence), unless it is
            # the one space after a token.
            if piece.startswith(" ") and tokens:
                piece = piece[1:]
            if not piece:
                continue
            pieces: tuple[str, ...] = (piece,)
        else:
            pieces = (piece,) if piece.isalpha() else _tokens(piece)
        for token in pieces:
            tokens += 1
            in_punct_chars = token in punct_chars
            if seen_period and not in_punct_chars and not _is_punct(token):
                sentences += 1
                seen_period = False
            elif in_punct_chars:
                seen_period = True
    return sentences if tokens else 1
