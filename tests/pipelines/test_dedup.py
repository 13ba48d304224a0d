"""Exact and fuzzy dedup: planted clusters are found, unrelated documents are left alone."""

import numpy as np
import pandas as pd

from looplm.pipelines.curation.dedup import (
    MinHashConfig,
    MinHasher,
    content_hash,
    duplicate_clusters,
    exact_duplicates,
    fuzzy_duplicates,
    near_duplicates,
    simplify,
)
from looplm.pipelines.noise import NoiseConfig, plant_defects
from looplm.pipelines.synthetic import profile_pages


def _shingles(text: str, n: int = 5) -> set[str]:
    words = simplify(text)
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_minhash_estimates_jaccard():
    """The share of equal signature entries tracks the exact Jaccard similarity of the shingle sets."""
    pages = profile_pages(40, seed=9)
    edited = [p.replace(" ", " extra words here ", k) for k, p in enumerate(pages[:20], start=1)]
    hasher = MinHasher(MinHashConfig())
    signatures, _ = hasher.signatures(pages[:20] + edited)
    errors = []
    for i in range(20):
        a, b = _shingles(pages[i]), _shingles(edited[i])
        exact = len(a & b) / len(a | b)
        errors.append(abs(np.mean(signatures[i] == signatures[20 + i]) - exact))
    # 112 hashes: standard error sqrt(J(1-J)/112) <= 0.047; the mean error over 20 pairs is far below 0.1.
    assert np.mean(errors) < 0.06
    same, _ = hasher.signatures([pages[0], pages[0]])
    assert (same[0] == same[1]).all()


def test_band_keys_and_empty_documents():
    hasher = MinHasher(MinHashConfig(num_bands=14, rows_per_band=8))
    signatures, has_shingles = hasher.signatures(["", "!!!", "one two three", profile_pages(1)[0]])
    assert has_shingles.tolist() == [False, False, True, True]  # fewer than 5 words still make one shingle
    keys = hasher.band_keys(signatures)
    assert keys.shape == (4, 14) and keys.dtype == np.uint64


def test_connected_components_join_chains():
    # 0~1 share band 0, 1~2 share band 1: one cluster {0, 1, 2}; 3 is alone.
    keys = np.array([[1, 10], [1, 20], [5, 20], [7, 30]], dtype=np.uint64)
    labels = duplicate_clusters(keys)
    assert labels[0] == labels[1] == labels[2] != labels[3]
    assert fuzzy_duplicates(["c", "a", "b", "d"], keys) == {"c": "a", "b": "a"}


def test_fuzzy_dedup_finds_planted_near_duplicates_and_spares_clean_pages():
    clean = [(f"bios-{i:05d}", t) for i, t in enumerate(profile_pages(600, seed=11, people_per_page=4))]
    config = NoiseConfig(exact_duplicate=0.0, near_duplicate=0.08, boilerplate=0, spam=0, foreign_language=0,
                         pii=0, contaminated=0)  # fmt: skip
    records = plant_defects(clean, config, seed=11)
    hasher = MinHasher(MinHashConfig())
    signatures, _ = hasher.signatures([r["text"] for r in records])
    frame = pd.DataFrame(
        {
            "key": [r["id"] for r in records],
            "removed_by": "",
            "band_keys": [k.tobytes() for k in hasher.band_keys(signatures)],
        }
    )
    removed = near_duplicates(frame, set(), MinHashConfig())
    near = {r["id"] for r in records if r["meta"]["defect"] == "near_duplicate"}
    assert len(near) == 48
    recall = len(near & set(removed)) / len(near)
    assert recall >= 0.9
    assert set(removed) <= near  # no clean page removed; the original of each cluster is kept
    original = {r["id"]: r["meta"]["of"] for r in records if r["meta"]["defect"] == "near_duplicate"}
    for key, (step, reason) in removed.items():
        assert step == "fuzzy_dedup" and reason.startswith(f"near-duplicate of {original[key]} ")


def test_exact_dedup_keeps_the_smallest_key_of_each_hash():
    texts = {"b": "same text", "a": "same text", "c": "other", "d": "same text", "e": "other", "f": "unique"}
    frame = pd.DataFrame(
        {"key": list(texts), "removed_by": "", "content_hash": [content_hash(t) for t in texts.values()]}
    )
    frame.loc[frame["key"] == "e", "removed_by"] = "langid"  # already removed: not a duplicate candidate
    removals = exact_duplicates(frame)
    assert removals == {"b": ("exact_dedup", "same text as a"), "d": ("exact_dedup", "same text as a")}
