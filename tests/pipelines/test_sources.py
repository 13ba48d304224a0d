"""Reading sources: bad records are quarantined with a reason, bad sources fail with an error naming them."""

import json

import pandas as pd
import pytest

from looplm.pipelines.sources import (
    SourceConfig,
    SourceError,
    _table_rows,
    generated_records,
    load_hf,
    parse_jsonl,
    parse_text_file,
)


def test_parse_jsonl_quarantines_bad_lines_and_keeps_good_ones():
    lines = [
        json.dumps({"id": "a", "text": "good one", "url": "http://x"}).encode(),
        b'{"id": "b", "text": "unterminated',
        b"",
        json.dumps({"id": "c", "body": "no text field"}).encode(),
        '{"id": "d", "text": "caf\u00e9"}'.encode("latin-1"),  # invalid UTF-8 byte
        b"[1, 2, 3]",
        json.dumps({"text": "no id", "n": 1}).encode(),
        json.dumps({"id": 5, "text": 42}).encode(),
    ]
    rows = parse_jsonl(b"\n".join(lines), "web", "part-0.jsonl", "text", "id")
    by_id = {r["id"]: r for r in rows}
    assert len(rows) == 7  # the blank line is not a record
    assert by_id["a"]["removed_by"] == "" and by_id["a"]["text"] == "good one"
    assert json.loads(by_id["a"]["meta"]) == {"url": "http://x"} and by_id["a"]["key"] == "web:part-0.jsonl:1"
    # Keys are file:line, unique per document whatever the ids; the source's id stays in `id`.
    assert len({r["key"] for r in rows}) == 7
    assert by_id["part-0.jsonl:2"]["reason"].startswith("malformed json")
    assert by_id["c"]["reason"] == "missing text field 'text'"
    assert by_id["part-0.jsonl:5"]["reason"].startswith("invalid utf-8 at byte")
    assert by_id["part-0.jsonl:6"]["reason"] == "not a JSON object: list"
    assert by_id["part-0.jsonl:7"]["removed_by"] == "" and by_id["part-0.jsonl:7"]["text"] == "no id"
    assert by_id["5"]["reason"] == "text field 'text' is int"
    assert all(r["removed_by"] == "read" for r in rows if r["reason"])


def test_parse_text_file_quarantines_invalid_utf8():
    assert parse_text_file("héllo".encode(), "docs", "a.txt")["text"] == "héllo"
    bad = parse_text_file(b"ok \xff\xfe bad", "docs", "b.txt")
    assert bad["removed_by"] == "read" and bad["reason"] == "invalid utf-8 at byte 3"


def test_table_rows_quarantine_null_text():
    frame = pd.DataFrame({"doc": ["x", "y"], "content": ["hello", None], "lang": ["en", "en"]})
    rows = _table_rows(frame, SourceConfig(name="t", kind="parquet", path="p", text_field="content", id_field="doc"))
    assert rows["removed_by"].tolist() == ["", "read"]
    assert rows["reason"].iloc[1] == "text field 'content' is null"
    assert json.loads(rows["meta"].iloc[0]) == {"lang": "en"}


def test_hf_local_dataset_folder(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["one", "two"], "id": ["1", "2"]}).save_to_disk(str(tmp_path / "ds"))
    dataset = load_hf(SourceConfig(name="hf", kind="hf", path=str(tmp_path / "ds")))
    assert dataset["text"] == ["one", "two"]
    with pytest.raises(SourceError, match="no text field 'body'"):
        load_hf(SourceConfig(name="hf", kind="hf", path=str(tmp_path / "ds"), text_field="body"))


def test_hf_hub_name_offline_fails_at_once_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="'web'.*not a local folder.*cannot be reached"):
        load_hf(SourceConfig(name="web", kind="hf", path="some-org/some-dataset"))


def test_config_errors_name_the_source():
    with pytest.raises(ValueError, match="source 'x': kind 'csv'"):
        SourceConfig(name="x", kind="csv", path="a")
    with pytest.raises(ValueError, match="source 'x': kind jsonl needs a path"):
        SourceConfig(name="x", kind="jsonl")


def test_generated_sources_are_deterministic_with_unique_keys():
    for kind in ("bios", "multihop", "mano"):
        config = SourceConfig(name=kind, kind=kind, count=30)
        rows = generated_records(config, seed=4)
        assert rows == generated_records(config, seed=4)
        assert len({r["key"] for r in rows}) == len(rows)
        assert all(r["text"] and r["removed_by"] == "" for r in rows)
    multihop = generated_records(SourceConfig(name="m", kind="multihop", count=30), seed=4)
    assert len(multihop) == 400 + 30  # a fact document per linked person, then the question documents
