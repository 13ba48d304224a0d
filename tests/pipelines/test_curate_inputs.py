"""Curation on a user's own files: what used to go wrong, one case each.

The first tests need no Ray (the inputs are checked before it starts); the rest share one local Ray."""

import dataclasses
import gzip
import json
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from looplm.pipelines.curate import CurateConfig, curate, run
from looplm.pipelines.curation.checks import LowYieldError, YieldConfig
from looplm.pipelines.sources import SourceConfig, SourceError
from looplm.platform.cli import main

PAGES = [
    "The harbour was quiet in the early morning, and the fishing boats had already left for the open sea. "
    "Along the quay, the owners of the small cafes were setting out tables and chairs for the day. "
    "By noon the market would be full of people, and the smell of bread and grilled fish would fill the air. "
    "Visitors often say that the town feels unchanged since the old photographs were taken. "
    "The museum near the church keeps a record of every storm that has reached the coast.",
    "Our library opened a new reading room this spring, with long tables, quiet lamps and a view of the garden. "
    "The collection of local history has moved there, and the staff have catalogued letters, maps and diaries "
    "that families donated over the last fifty years. Students come in the afternoon to work on their projects, "
    "while older readers prefer the calm of the morning. The room is open every day except on public holidays.",
    "Every autumn the valley hosts a small festival of apples, cider and music. Farmers bring carts of fruit from "
    "the hills, and children compete to press the sweetest juice. In the evening a band plays on the square, and "
    "the older people dance the same steps that their parents taught them. The festival has run for ninety years, "
    "and the town hall keeps a photograph from each one. Last year the rain stopped just before the concert began.",
    "The observatory on the ridge was built with money raised by the local astronomy club. On clear nights its "
    "volunteers open the dome to visitors, who take turns at the eyepiece to look at the rings of Saturn. The club "
    "also runs lessons for schools, and its members write a short column for the weekly paper about what can be "
    "seen in the sky. Most of the instruments were made by hand. The oldest telescope is more than a century old.",
]
# A fortune as `fortune` files print it: the title in nroff bold (each letter struck twice with a backspace).
TITLE = "Proverb"
OVERSTRUCK = "".join(f"{ch}\b{ch}" for ch in TITLE) + "\n\n" + PAGES[3]


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _zstd(data: bytes) -> bytes:
    return pa.Codec("zstd").compress(data, asbytes=True)


def test_missing_input_is_reported_before_ray_starts(tmp_path):
    import ray

    assert not ray.is_initialized()
    config = CurateConfig(sources=(SourceConfig(name="crawl", kind="jsonl", path=str(tmp_path / "nowhere.jsonl")),))
    started = time.perf_counter()
    with pytest.raises(SourceError, match=r"source 'crawl': .*nowhere.jsonl does not exist"):
        run(config, tmp_path / "out")
    assert time.perf_counter() - started < 5 and not ray.is_initialized()


def test_empty_jsonl_is_a_named_error_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    config = {"sources": [{"name": "mine", "kind": "jsonl", "path": str(tmp_path / "empty.jsonl")}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["curate", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "source 'mine'" in err and "holds no documents" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_builtin_eval_is_off_by_default():
    assert CurateConfig().builtin_eval is False


@pytest.mark.slow
def test_own_files_compressed_folder_reused_ids_overstrike_curation_only(local_ray, tmp_path):
    """One run over a folder of .jsonl.gz and .jsonl.zst files whose ids repeat, and a fortune in overstrike."""
    web = tmp_path / "web"
    web.mkdir()
    # a.jsonl.gz: ids 1 and 2 hold the same text (2 is an exact duplicate); b.jsonl.zst reuses id 2 for a
    # unique page, which must not be removed with a's duplicate.
    (web / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl([{"id": 1, "text": PAGES[0]}, {"id": 2, "text": PAGES[0]}])))
    (web / "b.jsonl.zst").write_bytes(_zstd(_jsonl([{"id": 2, "text": PAGES[2]}])))
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "proverb").write_text(OVERSTRUCK)
    config = CurateConfig(
        sources=(
            SourceConfig(name="web", kind="jsonl", path=str(web)),
            SourceConfig(name="fortunes", kind="text", path=str(fortunes)),
        ),
        tokenize=False,
        progress=False,
    )
    report = curate(config, tmp_path / "out")
    out = tmp_path / "out"
    kept = pd.read_parquet(out / "kept")
    removed = pd.read_parquet(out / "removed")
    # The overstruck title is cleaned (then dropped by C4 as a line of fewer than 3 words), not quarantined.
    assert sorted(kept["text"].str[:20]) == sorted(t[:20] for t in [PAGES[0], PAGES[2], PAGES[3]])
    (duplicate,) = removed.itertuples()
    assert duplicate.removed_by == "exact_dedup" and duplicate.key == "web:a.jsonl.gz:2"
    assert report["id_collisions"] == {"web": {"documents": 2, "ids": 1, "examples": ["2"]}}
    assert any("share 1 ids" in w for w in report["warnings"])
    # builtin_eval off: the decontamination set is empty, and the report says so.
    assert report["decontam"] == {"eval_texts": 0, "builtin_eval": False, "eval_files": []}
    # Curation only: no tokenizer, manifest or megatron files; marked done.
    assert not (out / "tokenizer.json").exists() and not (out / "megatron").exists()
    assert (out / "_SUCCESS").exists()

    # The local executor in this process (one CPU: no pool) writes the same kept and removed rows and report.
    local = tmp_path / "local"
    assert curate(dataclasses.replace(config, executor="local", num_cpus=1), local)["documents_kept"] == 3
    for folder in ("kept", "removed"):  # rows as values, in key order: see test_curate's test of the local executor
        rows = [pq.read_table(o / folder).sort_by("key").to_pylist() for o in (out, local)]
        assert rows[1] == rows[0], folder
    reports = [json.loads((o / "report" / "report.json").read_text()) for o in (out, local)]
    for entry in reports:
        del entry["seconds"], entry["seconds_per_phase"]
    assert reports[1] == reports[0] and (local / "_SUCCESS").exists()


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_wrong_text_field_fails_or_warns_as_chosen(executor, request, tmp_path):
    if executor == "ray":
        request.getfixturevalue("local_ray")
    (tmp_path / "docs.jsonl").write_bytes(_jsonl([{"id": i, "body": page} for i, page in enumerate(PAGES)]))
    source = SourceConfig(name="mine", kind="jsonl", path=str(tmp_path / "docs.jsonl"))
    config = CurateConfig(
        sources=(source,), progress=False, executor=executor, num_cpus=1 if executor == "local" else None
    )
    with pytest.raises(LowYieldError, match=r"source 'mine' kept none of 4 documents.*missing text field 'text'"):
        curate(config, tmp_path / "error")
    assert not (tmp_path / "error" / "_SUCCESS").exists()
    assert (tmp_path / "error" / "report" / "report.json").exists()

    warned = dataclasses.replace(config, tokenize=False, expect=YieldConfig(on_low_yield="warn"))
    report = curate(warned, tmp_path / "warn")
    assert report["documents_kept"] == 0 and (tmp_path / "warn" / "_SUCCESS").exists()
    assert "kept none of 4" in report["warnings"][0]
    assert "WARNING" in (tmp_path / "warn" / "report" / "report.md").read_text()


# A German page built around one long word that appears nowhere else: language ID removes it (another language),
# so neither the tokenizer's training nor the packed tokens may ever see that word.
MARKER = "Donaudampfschifffahrtsgesellschaftskapitaen"
GERMAN = " ".join(
    f"Der {MARKER} wohnt seit vielen Jahren in einem kleinen Haus am Ufer der Donau, und jeden Morgen geht der "
    f"{MARKER} zum Hafen, wo die Schiffe auf ihn warten."
    for _ in range(6)
)


@pytest.mark.slow
def test_only_kept_documents_are_tokenized(local_ray, tmp_path):
    from tokenizers import Tokenizer

    from looplm.pipelines.curation.pack import TokenizerConfig, encode, open_indexed

    records = [{"id": i, "text": page} for i, page in enumerate(PAGES)] + [{"id": "de", "text": GERMAN}]
    (tmp_path / "docs.jsonl").write_bytes(_jsonl(records))
    config = CurateConfig(
        sources=(SourceConfig(name="mine", kind="jsonl", path=str(tmp_path / "docs.jsonl")),),
        tokenizer=TokenizerConfig(vocab_size=400),
        progress=False,
    )
    report = curate(config, tmp_path / "out")
    out = tmp_path / "out"
    removed = pd.read_parquet(out / "removed")
    assert removed.loc[removed["id"] == "de", "removed_by"].tolist() == ["langid"]
    kept = [page for i, page in enumerate(PAGES) if str(i) not in set(removed["id"])]
    assert report["documents_kept"] == len(kept) >= 3
    # Tokenizer training: the marker repeats 12 times in one document, so a BPE trained on it would learn merges
    # of it (checked below by training on every document); the curated tokenizer has none.
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    fragments = {MARKER[i : i + 6] for i in range(len(MARKER) - 5)}
    learned = [token for token in tokenizer.get_vocab() if any(f in token for f in fragments)]
    assert learned == []
    # Encoding and packing: exactly the kept documents' tokens, in order, and nothing of the German page.
    manifest = json.loads((out / "mixture.json").read_text())
    packed = []
    for split in ("train", "valid"):
        if manifest["sources"]["mine"][split]["prefix"]:
            dataset = open_indexed(out / manifest["sources"]["mine"][split]["prefix"])
            packed += [dataset[i].tolist() for i in range(len(dataset))]
    expected = [tokens.tolist() for tokens in encode(tokenizer, kept, manifest["eod_id"])]
    assert sorted(packed) == sorted(expected)
    assert MARKER not in tokenizer.decode([t for doc in packed for t in doc])
    assert report["tokens_kept"] == sum(len(tokens) for tokens in expected)


def test_a_tokenizer_trained_on_the_removed_page_learns_the_marker():
    """The check above can fail: trained on every document, the same BPE does learn pieces of the marker."""
    from looplm.pipelines.curation.pack import TokenizerConfig, prepare_tokenizer

    tokenizer, _ = prepare_tokenizer(TokenizerConfig(vocab_size=400), [*PAGES, GERMAN])
    fragments = {MARKER[i : i + 6] for i in range(len(MARKER) - 5)}
    assert [token for token in tokenizer.get_vocab() if any(f in token for f in fragments)]
