"""Planted defects: counts, labels, and that each label describes the text."""

import collections
import json

import pytest

from looplm.pipelines.curation.langid import identify
from looplm.pipelines.noise import DEFECTS, NoiseConfig, plant_defects
from looplm.pipelines.synthetic import profile_pages


@pytest.fixture(scope="module")
def planted():
    clean = [(f"bios-{i:05d}", t) for i, t in enumerate(profile_pages(400, seed=5))]
    evals = ["Who is the tutor of the coach of the rival of Bob?\nAnswer: Ann"]
    return clean, plant_defects(clean, NoiseConfig(), seed=5, eval_texts=evals)


def test_counts_and_labels(planted):
    clean, records = planted
    counts = collections.Counter(r["meta"]["defect"] for r in records)
    config = NoiseConfig()
    for defect in DEFECTS:
        assert counts[defect] == round(getattr(config, defect) * len(clean)), defect
    assert counts["clean"] == len(clean) - counts["pii"] - counts["contaminated"]
    assert len({r["id"] for r in records}) == len(records)
    assert records == plant_defects(
        clean, config, seed=5, eval_texts=["Who is the tutor of the coach of the rival of Bob?\nAnswer: Ann"]
    )


def test_each_label_describes_its_text(planted):
    clean, records = planted
    original = dict(clean)
    for r in records:
        meta = r["meta"]
        if meta["defect"] == "exact_duplicate":
            assert r["text"] == original[meta["of"]] and r["id"] > meta["of"]
        elif meta["defect"] == "near_duplicate":
            assert r["text"] != original[meta["of"]] and 0 < meta["edit_fraction"] <= 0.1
        elif meta["defect"] == "pii":
            assert all(value in r["text"] for _, value in meta["pii"])
        elif meta["defect"] == "contaminated":
            assert meta["eval_text"] in r["text"]
        elif meta["defect"] == "foreign_language":
            assert identify([r["text"]])[0][0] == meta["language"]
    assert json.dumps(records)  # plain data, ready for a dataset


def test_bad_fractions_are_rejected():
    with pytest.raises(ValueError, match="noise.spam"):
        NoiseConfig(spam=1.5)
    with pytest.raises(ValueError, match="evaluation texts"):
        plant_defects([("a", "b c d")], NoiseConfig(contaminated=1.0), eval_texts=[])
