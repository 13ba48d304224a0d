"""`looplm curate` end to end on Ray Data: a small generated corpus with planted defects plus file sources with
bad input; every document is accounted for, the planted defects are found, and the packed data reads back."""

import dataclasses
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from looplm.pipelines.curate import CurateConfig, curate, load_curate_config
from looplm.pipelines.curation.pack import encode, open_indexed
from looplm.pipelines.sources import SourceConfig, SourceError
from looplm.platform.cli import main

GOOD_WEB = (
    "The harbour was quiet in the early morning, and the fishing boats had already left for the open sea. "
    "Along the quay, the owners of the small cafes were setting out tables and chairs for the day. "
    "By noon the market would be full of people, and the smell of bread and grilled fish would fill the air. "
    "Visitors often say that the town feels unchanged since the old photographs were taken. "
    "The museum near the church keeps a record of every storm that has reached the coast."
)

GOOD_TEXT = (
    "Our library opened a new reading room this spring, with long tables, quiet lamps and a view of the garden. "
    "The collection of local history has moved there, and the staff have catalogued letters, maps and diaries "
    "that families donated over the last fifty years. Students come in the afternoon to work on their projects, "
    "while older readers prefer the calm of the morning. The room is open every day except on public holidays. "
    "A small cafe next to the entrance serves tea and soup at lunchtime."
)

GOOD_PARQUET = (
    "Every autumn the valley hosts a small festival of apples, cider and music. Farmers bring carts of fruit from "
    "the hills, and children compete to press the sweetest juice. In the evening a band plays on the square, and "
    "the older people dance the same steps that their parents taught them. The festival has run for ninety years, "
    "and the town hall keeps a photograph from each one. Last year the rain stopped just before the concert began."
)
GOOD_HF = (
    "The observatory on the ridge was built with money raised by the local astronomy club. On clear nights its "
    "volunteers open the dome to visitors, who take turns at the eyepiece to look at the rings of Saturn. The club "
    "also runs lessons for schools, and its members write a short column for the weekly paper about what can be "
    "seen in the sky. Most of the instruments were made by hand. The oldest telescope is more than a century old."
)


def _write_bad_inputs(root: Path) -> dict[str, int]:
    """A jsonl source and a text-folder source with known bad records; returns the expected quarantine reasons."""
    web = root / "web"
    web.mkdir()
    lines = [
        json.dumps({"id": "w1", "text": GOOD_WEB, "url": "https://example.org/1"}),
        '{"id": "w2", "text": "broken',
        json.dumps({"id": "w3", "body": "no text"}),
        json.dumps({"id": "w4", "text": "   "}),
        json.dumps({"id": "w5", "text": "x" * 50_000}),
    ]
    data = "\n".join(lines).encode() + b"\n" + b'{"id": "w6", "text": "\xff\xfe"}\n'
    (web / "part-0.jsonl").write_bytes(data)
    docs = root / "docs"
    docs.mkdir()
    (docs / "good.txt").write_text(GOOD_TEXT)
    (docs / "binary.txt").write_text("PK\x03\x04" + "\x01\x02\x03" * 200 + GOOD_TEXT)
    (docs / "latin1.txt").write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    pd.DataFrame({"doc_id": ["p1", "p2"], "body": [GOOD_PARQUET, None], "lang": ["en", "en"]}).to_parquet(
        root / "table.parquet"
    )
    import datasets

    datasets.Dataset.from_dict({"text": [GOOD_HF], "id": ["h1"]}).save_to_disk(str(root / "hf_dataset"))
    return {
        "text field 'body' is null": 1,
        "malformed json": 1,
        "missing text field": 1,
        "empty document": 1,
        "max_doc_chars": 1,
        "invalid utf-8": 2,
        "binary": 1,
    }


E2E_OVERRIDES = ["sources.mano.count=12"]


@pytest.fixture(scope="module")
def e2e(local_ray, tmp_path_factory) -> tuple[Path, dict, dict[str, int]]:
    """The end-to-end config (every source kind, bad input, tokenize on), run once through the CLI on Ray Data into
    `folder/out`; returns (folder, config, the expected quarantine reasons). Shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("e2e")
    expected_quarantine = _write_bad_inputs(tmp_path)
    config = {
        "sources": [
            {"name": "bios", "kind": "bios", "count": 300, "weight": 0.7,
             "noise": {"exact_duplicate": 0.05, "near_duplicate": 0.05, "boilerplate": 0.03, "spam": 0.03,
                       "foreign_language": 0.05, "pii": 0.05, "contaminated": 0.03}},
            {"name": "multihop", "kind": "multihop", "count": 10, "weight": 0.2, "skip": ["langid", "quality"]},
            {"name": "mano", "kind": "mano", "count": 10, "weight": 0.1, "skip": ["langid", "quality", "pii"]},
            {"name": "web", "kind": "jsonl", "path": str(tmp_path / "web")},
            {"name": "docs", "kind": "text", "path": str(tmp_path / "docs")},
            {"name": "table", "kind": "parquet", "path": str(tmp_path / "table.parquet"), "text_field": "body",
             "id_field": "doc_id"},
            {"name": "hub", "kind": "hf", "path": str(tmp_path / "hf_dataset")},
        ],
        "input": {"max_doc_chars": 20_000},
        "builtin_eval": True,
        "tokenizer": {"vocab_size": 800},
        "pack": {"valid_fraction": 0.05},
        "progress": False,
        "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }  # fmt: skip
    (tmp_path / "curate.yaml").write_text(yaml.safe_dump(config))
    assert main(["curate", str(tmp_path / "curate.yaml"), *E2E_OVERRIDES, "--output", str(tmp_path / "out")]) == 0
    return tmp_path, config, expected_quarantine


@pytest.mark.slow
def test_curate_cli_end_to_end(e2e):
    tmp_path, config, expected_quarantine = e2e
    out = tmp_path / "out"
    report = json.loads((out / "report" / "report.json").read_text())

    # Every document is accounted for: kept + removed (with a reason, written out) = read.
    removed = pd.read_parquet(out / "removed")
    assert report["documents_kept"] + len(removed) == report["documents_read"]
    assert (removed["reason"] != "").all()
    quarantined = removed[removed["removed_by"] == "read"]
    assert report["quarantined"] == len(quarantined) == sum(expected_quarantine.values())
    for reason, count in expected_quarantine.items():
        assert quarantined["reason"].str.contains(reason).sum() == count, reason
    assert set(quarantined["source"]) == {"web", "docs", "table"}
    assert len(quarantined[quarantined["reason"].str.contains("max_doc_chars")]["text"].iloc[0]) <= 2000
    assert report["steps"][-1]["docs_out"] == report["documents_kept"]
    for row in report["steps"]:
        assert row["docs_in"] - row["docs_removed"] == row["docs_out"]
        assert row["chars_out"] <= row["chars_in"]

    # The planted defects are found (small corpus, so looser than the benchmark's targets for fuzzy dedup).
    planted = report["planted"]
    assert planted["exact_dedup"]["recall"]["exact_duplicate"]["recall"] == 1.0
    assert planted["exact_dedup"]["precision"] == 1.0
    assert planted["fuzzy_dedup"]["recall"]["near_duplicate"]["recall"] >= 0.9
    assert planted["fuzzy_dedup"]["good_documents_removed"] == 0
    assert planted["decontam"]["recall"]["contaminated"]["recall"] == 1.0
    assert planted["decontam"]["precision"] == 1.0
    assert planted["langid"]["recall"]["foreign_language"]["recall"] == 1.0
    assert planted["langid"]["precision"] >= 0.95  # what it identified as another language
    assert planted["langid"]["precision_excluding_other_junk"] >= 0.95
    assert planted["pii"]["recall"] == 1.0 and planted["pii"]["precision"] == 1.0
    # With the published rules (C4 counts every kept line as at least one sentence), a boilerplate page of seven
    # short menu lines passes C4 and then FineWeb's line-punctuation rule (1 of 7 lines); most are still removed.
    assert planted["quality"]["recall"]["spam"]["removed_by_any_step"] == 1.0
    assert planted["quality"]["recall"]["boilerplate"]["removed_by_any_step"] >= 0.8
    assert (out / "report" / "lengths.png").stat().st_size > 1000
    assert (out / "report" / "languages.png").stat().st_size > 1000

    # Packed data: one indexed dataset per source and split, the manifest's counts match what reads back,
    # and the good web document's tokens are exactly its text's encoding plus the end-of-document token.
    manifest = json.loads((out / "mixture.json").read_text())
    total = 0
    for name, entry in manifest["sources"].items():
        for split in ("train", "valid"):
            if entry[split]["prefix"] is None:
                assert entry[split]["documents"] == 0 and not (out / "megatron" / f"{name}_{split}.bin").exists()
                continue
            dataset = open_indexed(out / entry[split]["prefix"])
            assert len(dataset) == entry[split]["documents"]
            assert int(dataset.sequence_lengths.sum()) == entry[split]["tokens"]
            total += len(dataset)
            if name == "web" and len(dataset):
                from tokenizers import Tokenizer

                tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
                np.testing.assert_array_equal(dataset[0], encode(tokenizer, [GOOD_WEB], manifest["eod_id"])[0])
    assert total == report["documents_kept"]
    assert manifest["sources"]["mano"]["train"]["documents"] + manifest["sources"]["mano"]["valid"]["documents"] == 12
    kept_by_source = {
        name: e["train"]["documents"] + e["valid"]["documents"] for name, e in manifest["sources"].items()
    }
    assert kept_by_source["web"] == kept_by_source["docs"] == kept_by_source["table"] == kept_by_source["hub"] == 1
    # Sources sorted by name; the one-document sources are all in train.
    assert manifest["blend"]["train"]["weights"] == [0.7, 1.0, 1.0, 0.1, 0.2, 1.0, 1.0]
    assert manifest["blend"]["train"]["prefixes"][-1] == "megatron/web_train"
    assert manifest["eod_id"] == 0 and manifest["pad_id"] == 3

    # Logged to MLflow.
    client = mlflow.MlflowClient(config["mlflow_tracking_uri"])  # no global tracking URI: it would leak
    experiment = client.get_experiment_by_name("looplm-curate")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["decontam_precision"] == 1.0 and run.info.status == "FINISHED"
    assert run.data.params["langid.threshold"] == "0.65"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "curation_report")}
    assert {"curation_report/report.json", "curation_report/lengths.png"} <= artifacts


@pytest.mark.slow
def test_local_executor_writes_what_ray_data_writes(e2e, monkeypatch):
    """`executor=local` (no Ray: this process and a pool of two workers) on the end-to-end config against the Ray
    Data run: the same .bin/.idx, tokenizer and manifest byte for byte, the same removed rows with their reasons,
    and the same report but for its timings."""
    tmp_path, _, _ = e2e
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = [*E2E_OVERRIDES, "executor=local", "num_cpus=2", "mlflow_tracking_uri=null"]
    config = load_curate_config(tmp_path / "curate.yaml", overrides)
    assert config.executor == "local" and config.mlflow_tracking_uri is None
    ray_out, local = tmp_path / "out", tmp_path / "local"
    curate(config, local)

    assert (local / "_SUCCESS").exists()
    files = sorted(p.relative_to(ray_out) for p in (ray_out / "megatron").iterdir())
    assert len(files) >= 8 and files == sorted(p.relative_to(local) for p in (local / "megatron").iterdir())
    for name in [*files, Path("tokenizer.json"), Path("mixture.json")]:
        assert (local / name).read_bytes() == (ray_out / name).read_bytes(), name
    # The same columns and values, row for row, in key order: the order of Ray's files is not the pipeline's (the
    # packed files above keep that order). As values, not Arrow tables or pandas frames: the types of the columns
    # follow the writer's batches (Ray's are string or large_string from run to run; pandas' dtypes, kept in the
    # files' metadata, differ too), not the data.
    removed = [pq.read_table(out / "removed").sort_by("key").to_pylist() for out in (ray_out, local)]
    assert len(removed[0]) > 20 and removed[1] == removed[0]
    reports = [json.loads((out / "report" / "report.json").read_text()) for out in (ray_out, local)]
    for report in reports:
        assert report.pop("seconds") > 0 and report.pop("seconds_per_phase")
    assert reports[1] == reports[0]


def test_missing_or_unfit_source_fails_naming_it(local_ray, tmp_path):
    config = CurateConfig(sources=(SourceConfig(name="crawl", kind="jsonl", path=str(tmp_path / "nowhere")),))
    with pytest.raises(SourceError, match=r"source 'crawl': .*nowhere does not exist"):
        curate(config, tmp_path / "out")
    pd.DataFrame({"content": ["a"]}).to_parquet(tmp_path / "t.parquet")
    config = CurateConfig(sources=(SourceConfig(name="tab", kind="parquet", path=str(tmp_path / "t.parquet")),))
    with pytest.raises(SourceError, match=r"source 'tab': .*t.parquet has no text field 'text' \(columns: content\)"):
        curate(config, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    config = CurateConfig(sources=(SourceConfig(name="dir", kind="jsonl", path=str(tmp_path / "empty")),))
    with pytest.raises(SourceError, match=r"source 'dir': no .jsonl/.jsonl.gz/.*files under"):
        curate(config, tmp_path / "out")


def test_source_overrides_by_name_and_position(tmp_path):
    path = Path(__file__).parents[2] / "configs" / "curate-demo.yaml"
    config = load_curate_config(path, ["sources.bios.count=7", "sources.2.max_operators=16", "seed=3"])
    assert [s.count for s in config.sources] == [7, 200, 200]
    assert config.sources[2].max_operators == 16 and config.seed == 3
    with pytest.raises(ValueError, match="sources has no item named 'nope'"):
        load_curate_config(path, ["sources.nope.count=1"])
    with pytest.raises(ValueError, match=r"curate-demo.yaml.sources\[0\]: unknown field\(s\) cuont"):
        load_curate_config(path, ["sources.bios.cuont=1"])


@pytest.mark.slow
def test_same_config_gives_the_same_packed_bytes(local_ray, tmp_path):
    """The step cache keys outputs by config: a rerun must write identical tokenizer and .bin/.idx files, on
    either executor (the local one in pipeline order too: `crawl` is two files, `bios` three batches)."""
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    for name, texts in (("a.jsonl", [GOOD_WEB, GOOD_TEXT]), ("b.jsonl", [GOOD_PARQUET, GOOD_HF])):
        (crawl / name).write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    sources = (
        SourceConfig(name="bios", kind="bios", count=120, noise=CurateConfig().sources[0].noise),
        SourceConfig(name="mano", kind="mano", count=5, skip=("langid", "quality", "pii")),
        SourceConfig(name="crawl", kind="jsonl", path=str(crawl)),
    )
    config = CurateConfig(sources=sources, progress=False, batch_size=64, builtin_eval=True)
    # "b" first holds an unrelated run's output, which the rerun must replace, not mix with.
    stale = CurateConfig(sources=(SourceConfig(name="old", kind="mano", count=3, skip=("langid", "quality")),))
    curate(dataclasses.replace(stale, progress=False), tmp_path / "b")
    assert (tmp_path / "b" / "megatron" / "old_train.bin").exists()
    for run in ("a", "b"):
        curate(config, tmp_path / run)
    curate(dataclasses.replace(config, executor="local", num_cpus=2), tmp_path / "local")
    assert not list((tmp_path / "b" / "megatron").glob("old_*"))
    assert len(pd.read_parquet(tmp_path / "b" / "removed")) == len(pd.read_parquet(tmp_path / "a" / "removed"))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.suffix in (".bin", ".idx"))
    assert len(files) == 12  # three sources x (train, valid) x (.bin, .idx)
    assert open_indexed(tmp_path / "a" / "megatron" / "crawl_train").sequence_lengths.size == 3  # 2 + 2, one to valid
    for name in [*files, Path("tokenizer.json"), Path("mixture.json")]:
        for run in ("b", "local"):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / run / name).read_bytes(), (run, name)
