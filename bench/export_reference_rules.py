"""Export the rules of the reference implementations that looplm's quality filters reproduce, as data:

- spaCy 3.8's English tokenizer (prefixes, suffixes, infixes, URL pattern, special cases) and its sentencizer's
  sentence-final characters (spaCy is MIT-licensed), which datatrove uses to split English words and sentences;
- datatrove 0.10.1's punctuation sets (Apache-2.0): what Gopher quality counts as a symbol, and the terminal
  punctuation of its FineWeb filter.

    python bench/export_reference_rules.py pipelines/curation/reference_rules.json

looplm runs spaCy's algorithm on these rules (`pipelines/curation/words.py`), without spaCy or datatrove at run
time. Rerun when either pinned version changes (both are in the `bench` extra).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def export() -> dict:
    import datatrove
    import spacy
    from datatrove.utils.text import PUNCTUATION_SET, TERMINAL_PUNCTUATION
    from spacy.pipeline.sentencizer import Sentencizer
    from spacy.symbols import ORTH

    tokenizer = spacy.blank("en").tokenizer
    assert tokenizer.token_match is None  # English has none; words.py does not implement one
    return {
        "spacy": {
            "version": spacy.__version__,
            "prefix": tokenizer.prefix_search.__self__.pattern,
            "suffix": tokenizer.suffix_search.__self__.pattern,
            "infix": tokenizer.infix_finditer.__self__.pattern,
            "url": tokenizer.url_match.__self__.pattern,
            "special_cases": {k: [d.get(ORTH, d.get("ORTH")) for d in v] for k, v in sorted(tokenizer.rules.items())},
            "sentence_punct_chars": sorted(Sentencizer.default_punct_chars),
        },
        "datatrove": {
            "version": datatrove.__version__ if hasattr(datatrove, "__version__") else "0.10.1",
            "punctuation": "".join(sorted(PUNCTUATION_SET)),
            "terminal_punctuation": "".join(sorted(TERMINAL_PUNCTUATION)),
        },
    }


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.write_text(json.dumps(export(), ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"{out}: {out.stat().st_size / 1e3:.0f} kB")
