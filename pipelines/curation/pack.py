"""Tokenization and packing into Megatron indexed datasets (.bin/.idx), one per source and split.

The tokenizer is trained on the curated text (byte-level BPE, `looplm.model.tokenizer`) or loaded from a given
tokenizer.json (the Ouro tokenizer included); special tokens that it lacks are added. Every document is
followed by the end-of-document token, as Megatron's `preprocess_data.py --append-eod` does, so GPTDataset can
pack documents by concatenation.

The mixture manifest (mixture.json) names each source's train and valid prefixes (relative to its folder), its
weight and token counts, and per split the prefixes and weights of the blend: Megatron's
`GPTDatasetConfig(blend_per_split=[(train prefixes, weights), (valid prefixes, weights), None])`, with the
prefixes joined to the manifest's folder. A source with no documents in a split has no files for it (megatron
cannot map an empty .bin) and is left out of that split's blend.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

# looplm.model.tokenizer is imported inside the driver-side functions: importing it imports the model package
# and so torch (1.7 s and about 300 MB per Ray worker), which the tokenize stage's workers do not need.


@dataclass(frozen=True)
class TokenizerConfig:
    path: str | None = None  # a tokenizer.json (or a folder holding one) to load; None trains a byte-level BPE
    vocab_size: int = 8192
    min_frequency: int = 2
    max_train_docs: int = 200_000  # train on at most this many curated documents (the first, in order)


@dataclass(frozen=True)
class PackConfig:
    valid_fraction: float = 0.01  # documents drawn into the validation split, by a hash of their key
    split_seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"pack.valid_fraction must be in [0, 1), got {self.valid_fraction}")


def ensure_special_tokens(tokenizer: Tokenizer) -> list[str]:
    """Add the special tokens the tokenizer lacks (at the end of its vocabulary); returns those added."""
    from looplm.model.tokenizer import SPECIAL_TOKENS

    missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        tokenizer.add_special_tokens(missing)
    return missing


def prepare_tokenizer(config: TokenizerConfig, texts: Iterable[str]) -> tuple[Tokenizer, list[str]]:
    """(tokenizer, special tokens added): loaded from config.path, or trained on `texts`."""
    from looplm.model.tokenizer import load_tokenizer, train_byte_level_bpe

    if config.path:
        tokenizer = load_tokenizer(config.path)
    else:
        tokenizer = train_byte_level_bpe(texts, config.vocab_size, min_frequency=config.min_frequency)
    return tokenizer, ensure_special_tokens(tokenizer)


def token_dtype(vocab_size: int) -> type[np.number]:
    """Megatron's choice (DType.optimal_dtype): uint16 below 65,500 entries, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def split_of(key: str, valid_fraction: float, seed: int = 0) -> str:
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return "valid" if int.from_bytes(digest, "little") / 2**64 < valid_fraction else "train"


def encode(tokenizer: Tokenizer, texts: list[str], eod: int) -> list[np.ndarray]:
    """Token ids of each text followed by the end-of-document id `eod` (int32)."""
    return [np.array([*e.ids, eod], dtype=np.int32) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def _builder_class():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron warns at import that Transformer Engine and Apex are absent
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    return IndexedDatasetBuilder


def open_indexed(prefix: str | Path):
    """Megatron's reader of a .bin/.idx pair."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(str(prefix))


class IndexedWriter:
    """One Megatron indexed dataset: documents appended in order, then finalised."""

    def __init__(self, prefix: Path, dtype: type[np.number]):
        prefix.parent.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.builder = _builder_class()(str(prefix) + ".bin", dtype=dtype)
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self.builder.add_document(tokens, [len(tokens)])
        self.documents += 1
        self.tokens += len(tokens)

    def finalize(self) -> None:
        self.builder.finalize(str(self.prefix) + ".idx")


def write_manifest(
    folder: Path,
    writers: dict[tuple[str, str], IndexedWriter],
    weights: dict[str, float],
    tokenizer: Tokenizer,
    added_tokens: list[str],
) -> dict:
    """mixture.json: per-source prefixes, weights and counts, and the blend (prefixes, weights) per split."""
    from looplm.model.tokenizer import END_OF_DOCUMENT, PAD, SPECIAL_TOKENS

    sources: dict[str, dict] = {}
    blend: dict[str, dict[str, list]] = {split: {"prefixes": [], "weights": []} for split in ("train", "valid")}
    for source in sorted(weights):
        entry = sources[source] = {"weight": weights[source]}
        for split in ("train", "valid"):
            writer = writers.get((source, split))
            if writer is None:  # no document of this source in this split: no files (megatron cannot map them)
                entry[split] = {"prefix": None, "documents": 0, "tokens": 0}
                continue
            prefix = str(writer.prefix.relative_to(folder))
            entry[split] = {"prefix": prefix, "documents": writer.documents, "tokens": writer.tokens}
            blend[split]["prefixes"].append(prefix)
            blend[split]["weights"].append(weights[source])
    manifest = {
        "format": "megatron-indexed",
        "tokenizer": "tokenizer.json",
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "dtype": np.dtype(token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))).name,
        "special_tokens": {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS},
        "eod_id": tokenizer.token_to_id(END_OF_DOCUMENT),
        "pad_id": tokenizer.token_to_id(PAD),
        "special_tokens_added": added_tokens,
        "sources": sources,
        "blend": blend,
    }
    (folder / "mixture.json").write_text(json.dumps(manifest, indent=2))
    return manifest
