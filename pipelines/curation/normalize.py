"""Text normalisation: mojibake repair and Unicode NFC (ftfy), then whitespace.

Whitespace rules: tabs and runs of spaces become one space, lines lose trailing spaces, runs of three or more
newlines become a paragraph break (two), and the document is stripped. Line structure is kept because the
quality filters read it (Gopher's duplicate lines and paragraphs, C4's per-line rules).
"""

from __future__ import annotations

import re

import ftfy

_SPACES = re.compile(r"[^\S\n]+")  # whitespace other than newlines
_TRAILING = re.compile(r" +\n")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    text = ftfy.fix_text(text, normalization="NFC")
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()
