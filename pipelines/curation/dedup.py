"""Exact dedup by content hash, and fuzzy dedup by MinHash LSH with connected components (FineWeb's setup).

FineWeb (`datatrove/examples/fineweb.py`): word 5-gram shingles of the simplified text (lowercased, punctuation
removed, whitespace collapsed), 112 hash functions in 14 bands of 8 rows. Two documents that agree on every
row of any one band are duplicates; duplicates form clusters by connected components, and one document per
cluster is kept (here the one with the smallest id, so the choice does not depend on partitioning).

Signatures are computed a batch at a time in numpy: each word is hashed once (blake2b, 64 bits), a shingle's
hash is a polynomial of its word hashes, and the 112 permutations are multiply-add-shift hashes
(Dietzfelbinger) of the shingle hashes, reduced per document with `np.minimum.reduceat`. bench/curate_bench.py
measures this against datasketch's MinHash.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

_NON_WORD = re.compile(r"[\W_]+")


@dataclass(frozen=True)
class MinHashConfig:
    n_grams: int = 5
    num_bands: int = 14
    rows_per_band: int = 8
    seed: int = 1

    @property
    def num_hashes(self) -> int:
        return self.num_bands * self.rows_per_band


def content_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def simplify(text: str) -> list[str]:
    """datatrove's `simplify_text` for shingling: lowercase, punctuation removed, split on whitespace."""
    return _NON_WORD.sub(" ", text.lower()).split()


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


_SHINGLE_BASE = np.uint64(0x9E3779B97F4A7C15)


def _shingle_hashes(words: list[str], n: int, cache: dict[str, int]) -> np.ndarray:
    """uint64 hashes of the word n-grams (one shingle of all the words when there are fewer than n)."""
    if not words:
        return np.empty(0, dtype=np.uint64)
    values = np.fromiter((cache.get(w) or cache.setdefault(w, _word_hash(w)) for w in words), np.uint64, len(words))
    n = min(n, len(values))
    count = len(values) - n + 1
    hashes = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic mod 2**64 is the point
        for j in range(n):
            hashes = hashes * _SHINGLE_BASE + values[j : j + count]
    return hashes


class MinHasher:
    """MinHash signatures (uint32, `num_hashes` per document) and LSH band keys (uint64, `num_bands`)."""

    chunk_docs = 256

    def __init__(self, config: MinHashConfig):
        self.config = config
        rng = np.random.default_rng(config.seed)
        self.a = rng.integers(1, 2**63, config.num_hashes, dtype=np.uint64) | np.uint64(1)  # odd multipliers
        self.b = rng.integers(0, 2**63, config.num_hashes, dtype=np.uint64)
        self.row_mix = rng.integers(1, 2**63, config.rows_per_band, dtype=np.uint64) | np.uint64(1)

    def signatures(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(signatures [docs, num_hashes] uint32, has_shingles [docs] bool); empty documents get all-max rows."""
        cache: dict[str, int] = {}
        parts = [_shingle_hashes(simplify(t), self.config.n_grams, cache) for t in texts]
        lengths = np.array([len(p) for p in parts])
        signatures = np.full((len(texts), self.config.num_hashes), np.iinfo(np.uint32).max, dtype=np.uint32)
        nonempty = lengths > 0
        # A few hundred documents at a time keep the [shingles, 112] matrix in cache (a 10k-document batch
        # would allocate over a gigabyte and run 3x slower).
        for lo in range(0, len(texts), self.chunk_docs):
            chunk = [i for i in range(lo, min(lo + self.chunk_docs, len(texts))) if lengths[i]]
            if not chunk:
                continue
            shingles = np.concatenate([parts[i] for i in chunk])
            starts = np.concatenate([[0], np.cumsum(lengths[chunk])[:-1]])
            signatures[chunk] = np.minimum.reduceat(self._permute(shingles), starts, axis=0)
        return signatures, nonempty

    def _permute(self, shingles: np.ndarray) -> np.ndarray:
        """[shingles, num_hashes] uint32: the high half of (a * x + b) mod 2**64, computed in place (3x faster
        than the expression with temporaries)."""
        out = np.empty((len(shingles), self.config.num_hashes), dtype=np.uint64)
        with np.errstate(over="ignore"):
            np.multiply(shingles[:, None], self.a, out=out)
            out += self.b
        out >>= np.uint64(32)
        return out.astype(np.uint32)

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """[docs, num_bands] uint64: each band's rows folded into one key."""
        c = self.config
        rows = signatures.reshape(len(signatures), c.num_bands, c.rows_per_band).astype(np.uint64)
        with np.errstate(over="ignore"):
            return (rows * self.row_mix).sum(axis=2, dtype=np.uint64)


def duplicate_clusters(band_keys: np.ndarray) -> np.ndarray:
    """Connected components over 'shares a band key': a cluster label per document (labels are 0..k-1)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(band_keys)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    sources, targets = [], []
    for band in range(band_keys.shape[1]):
        keys = band_keys[:, band]
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        # Link each document to the first document of its bucket: a star per bucket, same components.
        starts = np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]])
        first = order[np.maximum.accumulate(np.where(starts, np.arange(n), 0))]
        linked = first != order
        sources.append(order[linked])
        targets.append(first[linked])
    src = np.concatenate(sources)
    dst = np.concatenate(targets)
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def fuzzy_duplicates(ids: list[str], band_keys: np.ndarray) -> dict[str, str]:
    """{removed id: kept id} for every document in a cluster of two or more, keeping the smallest id."""
    labels = duplicate_clusters(band_keys)
    keeper: dict[int, str] = {}
    for doc_id, label in zip(ids, labels, strict=True):
        if label not in keeper or doc_id < keeper[label]:
            keeper[label] = doc_id
    return {doc_id: keeper[label] for doc_id, label in zip(ids, labels, strict=True) if keeper[label] != doc_id}


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


# --- driver-side clustering over the whole corpus's keys (pandas frame: key, removed_by, content_hash, band_keys) ---


def exact_duplicates(frame) -> dict[str, tuple[str, str]]:
    """{key: ('exact_dedup', reason)} for all but the smallest key of each content hash."""
    candidates = frame[(frame["removed_by"] == "") & (frame["content_hash"] != "")]
    removals = {}
    for _, group in candidates.groupby("content_hash"):
        if len(group) > 1:
            keys = sorted(group["key"])
            for key in keys[1:]:
                removals[key] = ("exact_dedup", f"same text as {keys[0]}")
    return removals


def near_duplicates(frame, exclude: set[str], config: MinHashConfig) -> dict[str, tuple[str, str]]:
    """{key: ('fuzzy_dedup', reason)} for all but one document of each MinHash LSH cluster."""
    candidates = frame[(frame["removed_by"] == "") & (frame["band_keys"].map(len) > 0)]
    candidates = candidates[~candidates["key"].isin(exclude)]
    if candidates.empty:
        return {}
    bands = np.frombuffer(b"".join(candidates["band_keys"]), dtype=np.uint64).reshape(len(candidates), -1)
    found = fuzzy_duplicates(candidates["key"].tolist(), bands)
    return {key: ("fuzzy_dedup", f"near-duplicate of {kept} (MinHash LSH cluster)") for key, kept in found.items()}
