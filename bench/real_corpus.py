"""A real-text corpus built from what is installed on a Debian machine, for the curation benchmark and the
filter test set: man pages (rendered by groff, bold and underline in backspace overstrike as nroff prints them),
licences, Debian changelogs and copyright files, Python docstrings from the installed packages, and fortunes in
several languages (from the Debian `fortunes*` packages, if a folder of them is given: `apt-get download fortunes
fortunes-de fortunes-es fortunes-it fortunes-ru fortunes-pl` and `dpkg-deb -x` each into one folder).

    python bench/real_corpus.py corpus OUT_DIR [--docs 25000] [--fortunes DIR]
    python bench/real_corpus.py testset tests/pipelines/data/filters_real.jsonl --corpus OUT_DIR [--docs 400]
    python bench/real_corpus.py compare tests/pipelines/data/filters_real.jsonl   # looplm vs stored verdicts

`corpus` writes JSONL shards ({"id", "origin", "text"}), the order fixed by sorted paths, so the same machine
gives the same corpus. `testset` draws English documents from a corpus (fastText lid.176, as FineWeb) and stores,
for each, the verdict of each of datatrove 0.10.1's filters run alone with FineWeb's settings: the reference
verdicts the filter test compares looplm against (datatrove is needed here, never at test time).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import itertools
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MAX_DOC_CHARS = 20_000  # longer texts are cut into parts at line boundaries


def _chunks(text: str, limit: int = MAX_DOC_CHARS) -> Iterator[str]:
    part: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        if size + len(line) > limit and part:
            yield "".join(part)
            part, size = [], 0
        part.append(line)
        size += len(line)
    if part:
        yield "".join(part)


def _read(path: Path) -> str | None:
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None


def man_pages(limit: int) -> Iterator[tuple[str, str]]:
    pages = sorted(p for p in Path("/usr/share/man").glob("man[1-8]/*") if p.is_file())
    step = max(1, len(pages) // max(1, limit))
    chosen = pages[::step][:limit]

    def render(path: Path) -> tuple[str, str]:
        source = _read(path)
        if source is None or source.startswith(".so "):
            return str(path), ""
        done = subprocess.run(
            ["groff", "-man", "-Tutf8", "-P-c", "-rLL=78n"], input=source, capture_output=True, text=True,
            timeout=30, env={**os.environ, "GROFF_NO_SGR": "1"},
        )  # fmt: skip
        return str(path), done.stdout

    with ThreadPoolExecutor(4) as pool:
        for path, text in pool.map(render, chosen):
            for i, part in enumerate(_chunks(text)):
                if part.strip():
                    yield f"man:{path}:{i}", part


def licences() -> Iterator[tuple[str, str]]:
    paths = sorted(Path("/usr/share/common-licenses").iterdir()) + sorted(Path("/usr/share/doc").glob("*/copyright"))
    for path in paths:
        text = _read(path) if path.is_file() else None
        for i, part in enumerate(_chunks(text or "")):
            if part.strip():
                yield f"licence:{path}:{i}", part


def changelogs() -> Iterator[tuple[str, str]]:
    """Debian and upstream changelogs, cut into parts of whole entries of at most 6,000 characters."""
    paths = sorted(Path("/usr/share/doc").glob("*/changelog*"))
    for path in paths:
        text = _read(path) if path.is_file() else None
        for i, part in enumerate(_chunks(text or "", 6000)):
            if part.strip():
                yield f"changelog:{path}:{i}", part


def docstrings(root: Path, min_chars: int = 300) -> Iterator[tuple[str, str]]:
    for path in sorted(root.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    name, line = getattr(node, "name", "<module>"), getattr(node, "lineno", 0)
                    yield f"docstring:{path.relative_to(root)}:{name}:{line}", doc


def fortunes(root: Path) -> Iterator[tuple[str, str]]:
    """Fortunes, one file's next fortune after another's (round robin), so every language and topic comes early."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and "fortunes" in str(p) and "/doc/" not in str(p))
    queues = []
    for path in files:
        if path.suffix in (".dat", ".gz") or path.name.endswith(".u8"):
            continue
        text = _read(path)
        if text is not None:
            items = [(f"fortune:{path.relative_to(root)}:{i}", t) for i, t in enumerate(re.split(r"\n%\n", text))]
            queues.append([item for item in items if item[1].strip()])
    for round_items in itertools.zip_longest(*queues):
        yield from (item for item in round_items if item is not None)


def build_corpus(out: Path, docs: int, fortune_root: Path | None, shard_docs: int = 2000) -> int:
    """Write about `docs` documents as JSONL shards; returns how many. Origins are mixed in fixed shares, so a
    smaller corpus is a sample of a larger one."""
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    origins = {
        "man": man_pages(int(docs * 0.25)),
        "licence": licences(),
        "changelog": changelogs(),
        "docstring": docstrings(site),
        "fortune": fortunes(fortune_root) if fortune_root else iter(()),
    }
    shares = {"man": 0.25, "licence": 0.08, "changelog": 0.22, "docstring": 0.25, "fortune": 0.20}
    records = []
    for origin, items in origins.items():
        want = int(docs * shares[origin])
        got = 0
        for doc_id, text in items:
            records.append({"id": doc_id, "origin": origin, "text": text})
            got += 1
            if got >= want:
                break
        print(f"{origin}: {got} documents", file=sys.stderr)
    random.Random(0).shuffle(records)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.jsonl"):
        old.unlink()
    for n, start in enumerate(range(0, len(records), shard_docs)):
        with open(out / f"part-{n:05d}.jsonl", "w", encoding="utf-8") as file:
            for record in records[start : start + shard_docs]:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(records)


def read_corpus(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob("part-*.jsonl")) for line in path.open(encoding="utf-8")]


# --- the reference verdicts (datatrove 0.10.1, FineWeb's settings) ---------------------------------------------

FILTERS = ("gopher_repetition", "gopher_quality", "c4", "fineweb")


def reference_filters() -> dict:
    """datatrove's filters as FineWeb's pipeline configures them (C4 without the terminal-punctuation rule)."""
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    return {
        "gopher_repetition": GopherRepetitionFilter(),
        "gopher_quality": GopherQualityFilter(),
        "c4": C4QualityFilter(filter_no_terminal_punct=False),
        "fineweb": FineWebQualityFilter(),
    }


def reference_verdicts(text: str, filters: dict) -> dict[str, str]:
    """Per filter alone: '' when the document is kept, else datatrove's reason."""
    from datatrove.data import Document

    verdicts = {}
    for name, flt in filters.items():
        result = flt.filter(Document(text=text, id="x"))
        verdicts[name] = "" if result is True else (result[1] if isinstance(result, tuple) else "removed")
    return verdicts


def build_testset(corpus: Path, out: Path, docs: int, max_chars: int = 4000) -> None:
    """English documents of at most `max_chars` (normalized as looplm's normalize step does, so both sides see
    the same text), drawn evenly across origins, with datatrove's verdicts."""
    from looplm.pipelines.curation.langid import identify
    from looplm.pipelines.curation.normalize import normalize_text

    records = read_corpus(corpus)
    random.Random(1).shuffle(records)
    filters = reference_filters()
    per_origin: dict[str, int] = {}
    origins = sorted({r["origin"] for r in records})
    chosen = []
    for record in records:
        text = normalize_text(record["text"])
        if not text or len(text) > max_chars or per_origin.get(record["origin"], 0) >= docs // len(origins):
            continue
        ((language, score),) = identify([text])
        if language != "en" or score < 0.65:
            continue
        per_origin[record["origin"]] = per_origin.get(record["origin"], 0) + 1
        chosen.append({"id": record["id"], "origin": record["origin"], "text": text,
                       "datatrove_0_10_1": reference_verdicts(text, filters)})  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as file:
        for item in chosen:
            file.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"{len(chosen)} documents, {out.stat().st_size / 1e6:.2f} MB: {per_origin}", file=sys.stderr)


def disagreement(items: list[dict], config=None) -> dict[str, tuple[int, int]]:
    """Per filter: (documents looplm judges differently from the stored reference verdicts, documents)."""
    from looplm.pipelines.curation.quality import QUALITY_FILTERS, QualityConfig

    config = config or QualityConfig()
    counts = {}
    for step, check in QUALITY_FILTERS:
        ours = [bool(check(i["text"], getattr(config, step))[0]) for i in items]
        differ = sum(o != bool(i["datatrove_0_10_1"][step]) for o, i in zip(ours, items, strict=True))
        counts[step] = (differ, len(items))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("out", type=Path)
    c.add_argument("--docs", type=int, default=25_000)
    c.add_argument("--fortunes", type=Path, default=None, help="folder with the fortunes packages extracted")
    t = sub.add_parser("testset")
    t.add_argument("out", type=Path)
    t.add_argument("--corpus", type=Path, required=True)
    t.add_argument("--docs", type=int, default=400)
    m = sub.add_parser("compare")
    m.add_argument("testset", type=Path)
    args = parser.parse_args()
    if args.command == "corpus":
        print(build_corpus(args.out, args.docs, args.fortunes), "documents")
    elif args.command == "testset":
        build_testset(args.corpus, args.out, args.docs)
    else:
        from looplm.pipelines.curation.quality import FineWebConfig, GopherQualityConfig, QualityConfig

        items = [json.loads(line) for line in args.testset.open(encoding="utf-8")]
        as_datatrove = QualityConfig(
            gopher_quality=GopherQualityConfig(alpha_words="fineweb"), fineweb=FineWebConfig(released=False)
        )
        print("| filter | looplm (defaults) differs from datatrove 0.10.1 | looplm, datatrove's readings |")
        print("|---|---:|---:|")
        default, strict = disagreement(items), disagreement(items, as_datatrove)
        for step, (differ, n) in default.items():
            print(f"| {step} | {differ} of {n} ({differ / n:.1%}) | {strict[step][0]} of {n} |")


if __name__ == "__main__":
    main()
