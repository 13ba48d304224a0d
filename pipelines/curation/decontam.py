"""Decontamination: a training document sharing a word n-gram (13 by default) with any evaluation text is removed.

Words are datatrove's simplified words (lowercased, punctuation removed), so "Answer:" and "answer" match. An
evaluation text shorter than n words contributes itself whole (GPT-3's rule for short items), so short questions
are still caught; the document must then contain that exact run of words.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from looplm.pipelines.curation.dedup import simplify


@dataclass(frozen=True)
class DecontamConfig:
    n_gram: int = 13
    # jsonl files ({"text": ...} per line) or plain-text files (one item per line) holding evaluation items;
    # the generated sources add their own held-out evaluation items.
    eval_files: tuple[str, ...] = ()


class EvalIndex:
    """The n-grams of the evaluation texts, as strings, grouped by length."""

    def __init__(self, texts: Iterable[str], n: int):
        self.n = n
        self.grams: dict[int, set[str]] = {}
        self.num_texts = 0
        for text in texts:
            words = simplify(text)
            if not words:
                continue
            self.num_texts += 1
            size = min(n, len(words))
            bucket = self.grams.setdefault(size, set())
            bucket.update(" ".join(words[i : i + size]) for i in range(len(words) - size + 1))

    def first_match(self, text: str) -> str:
        """The first shared n-gram, or '' when the text shares none."""
        words = simplify(text)
        for size, grams in self.grams.items():
            for i in range(len(words) - size + 1):
                gram = " ".join(words[i : i + size])
                if gram in grams:
                    return gram
        return ""
