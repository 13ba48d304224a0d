"""Text normalisation: backspace overstrike resolved, mojibake repair and Unicode NFC (ftfy), then whitespace.

Overstrike (`X\\bX` for bold, `_\\bX` for underline, as nroff prints man pages and old fortunes do) is resolved
the way `col -b` does: a character followed by a backspace is deleted, so the character struck last stays. ftfy
alone would delete only the backspaces and leave "__AABB" for an underlined, bold "AB".

Whitespace rules: tabs and runs of spaces become one space, lines lose trailing spaces, runs of three or more
newlines become a paragraph break (two), and the document is stripped. Line structure is kept because the
quality filters read it (Gopher's duplicate lines and paragraphs, C4's per-line rules).
"""

from __future__ import annotations

import re

import ftfy

_OVERSTRIKE = re.compile(r"[^\x08\n]\x08")
_SPACES = re.compile(r"[^\S\n]+")  # whitespace other than newlines
_TRAILING = re.compile(r" +\n")
_BLANK_LINES = re.compile(r"\n{3,}")


def resolve_overstrike(text: str) -> str:
    """`col -b`: every character followed by a backspace is removed (repeatedly, for `A\\b\\bB`)."""
    while "\x08" in text:
        fixed = _OVERSTRIKE.sub("", text)
        if fixed == text:
            break
        text = fixed
    return text


def normalize_text(text: str) -> str:
    text = resolve_overstrike(text)
    text = ftfy.fix_text(text, normalization="NFC")
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()
