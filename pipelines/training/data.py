"""Training data through Megatron's indexed datasets: GPTDataset samples, blended by mixture weights.

The data comes from exactly one source named in the config (`DataConfig`): a curated manifest, indexed dataset
paths, or the synthetic generator. A manifest (`looplm curate`'s mixture.json) brings its own train and valid
blends (Megatron's blend_per_split), end-of-document id and tokenizer: `with_manifest` fills them into the
training config (and rejects a vocabulary larger than the model's embedding), and `copy_tokenizer` puts the
tokenizer into the run's HF export so it evaluates, registers and serves as it is.

`build_datasets` returns the train and valid splits (BlendedMegatronDatasetBuilder over GPTDataset); a sample's
index is a pure function of (samples consumed before the optimizer step, accumulation step, DP rank, position),
and the samples consumed are a function of the step, so the data position of a resumed run is its step.
`write_indexed_dataset` writes a `.bin`/`.idx` pair through the curation's writer (one dtype rule for both);
`write_synthetic_corpus` makes a small learnable mixture for CPU runs and tests.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from looplm.model.config import ConfigError
from looplm.model.objectives import IGNORE_INDEX
from looplm.pipelines.curation.pack import IndexedWriter, token_dtype

from .config import DataConfig, PretrainConfig

MANIFEST_FILE = "mixture.json"


class VocabularyTooLargeError(ConfigError):
    """The curated tokenizer has more entries than the model's embedding: tokens would index past it."""


@dataclass(frozen=True)
class Manifest:
    """A curated folder's mixture.json, with its prefixes made absolute."""

    folder: Path
    vocab_size: int
    eod_id: int
    pad_id: int | None
    tokenizer: Path
    train: tuple[tuple[str, ...], tuple[float, ...]]  # (prefixes, weights) of the train blend
    valid: tuple[tuple[str, ...], tuple[float, ...]]  # the same for the valid blend (may be empty)


def read_manifest(folder: str | Path) -> Manifest:
    """Read `<folder>/mixture.json`; a missing file or field is an error naming the file."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ConfigError(f"data.manifest: {path} not found (a curated folder holds mixture.json; run looplm curate)")
    try:
        data = json.loads(path.read_text())
        blend = data["blend"]
        train = tuple(str(folder / p) for p in blend["train"]["prefixes"]), tuple(blend["train"]["weights"])
        valid = tuple(str(folder / p) for p in blend["valid"]["prefixes"]), tuple(blend["valid"]["weights"])
        manifest = Manifest(
            folder=folder,
            vocab_size=int(data["vocab_size"]),
            eod_id=int(data["eod_id"]),
            pad_id=None if data.get("pad_id") is None else int(data["pad_id"]),
            tokenizer=folder / data["tokenizer"],
            train=train,
            valid=valid,
        )
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a mixture manifest ({type(err).__name__}: {err})") from None
    if not manifest.train[0]:
        raise ConfigError(f"{path}: the train blend is empty (every document was removed or held out)")
    if not manifest.tokenizer.is_file():
        raise ConfigError(f"{path}: its tokenizer {manifest.tokenizer} is missing")
    return manifest


def with_manifest(config: PretrainConfig) -> PretrainConfig:
    """The config with a manifest's end-of-document id and the model's special token ids filled in (ids the
    YAML sets itself are kept). Raises VocabularyTooLargeError when the tokenizer outgrows the embedding."""
    if config.data.manifest is None:
        return config
    manifest = read_manifest(config.data.manifest)
    model = config.model.build()
    if manifest.vocab_size > model.vocab_size:
        raise VocabularyTooLargeError(
            f"data.manifest {manifest.folder}: its tokenizer has {manifest.vocab_size} entries but model "
            f"{config.model.preset!r} embeds {model.vocab_size}; set model.overrides.vocab_size >= "
            f"{manifest.vocab_size} or curate with tokenizer.vocab_size <= {model.vocab_size}"
        )
    ids = {"bos_token_id": manifest.eod_id, "eos_token_id": manifest.eod_id}
    if manifest.pad_id is not None:
        ids["pad_token_id"] = manifest.pad_id
    overrides = {**ids, **config.model.overrides}
    return config.replace(
        model=dataclasses.replace(config.model, overrides=overrides),
        data=dataclasses.replace(config.data, eod_token=manifest.eod_id),
    )


def copy_tokenizer(config: PretrainConfig, hf_folder: str | Path) -> Path | None:
    """Put the manifest's tokenizer.json into the HF export (None when the data has no tokenizer)."""
    hf_folder = Path(hf_folder)
    if config.data.manifest is None or not hf_folder.is_dir():
        return None
    target = hf_folder / "tokenizer.json"
    shutil.copyfile(read_manifest(config.data.manifest).tokenizer, target)
    return target


class _Tokenizer:
    """The attributes GPTDataset reads from a tokenizer (documents are already token ids)."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size, self.eod, self.pad, self.bos = vocab_size, eod, -1, None
        self.unique_identifiers = {"class": "looplm", "vocab_size": vocab_size, "eod": eod}


def write_indexed_dataset(prefix: str | Path, documents: Iterable[Sequence[int]], vocab_size: int) -> Path:
    """Write documents (lists of token ids, each already ending in its EOD) as prefix.bin / prefix.idx."""
    prefix = Path(prefix)
    writer = IndexedWriter(prefix, token_dtype(vocab_size))
    for doc in documents:
        writer.add(np.asarray(doc, dtype=np.int64))
    writer.finalize()
    return prefix


def synthetic_documents(num_docs: int, vocab_size: int, eod: int, seed: int, kind: str) -> list[list[int]]:
    """Learnable toy text over the first (at most) 128 ids: 'counting' runs a+k*s, 'motif' repeats a short motif."""
    rng = np.random.default_rng(seed)
    vocab_size = min(vocab_size, 128)
    docs = []
    for _ in range(num_docs):
        length = int(rng.integers(16, 96))
        if kind == "counting":
            start, stride = int(rng.integers(1, vocab_size)), int(rng.integers(1, 4))
            body = [1 + (start + i * stride) % (vocab_size - 1) for i in range(length)]
        else:
            motif = rng.integers(1, vocab_size, size=int(rng.integers(2, 6))).tolist()
            body = (motif * (length // len(motif) + 1))[:length]
        docs.append([t if t != eod else 1 for t in body] + [eod])
    return docs


def write_synthetic_corpus(directory: str | Path, vocab_size: int, eod: int, num_docs: int = 400) -> list[str]:
    """Two synthetic sources as indexed datasets; returns their path prefixes."""
    prefixes = []
    for seed, kind in enumerate(("counting", "motif")):
        prefix = Path(directory) / kind
        if not Path(f"{prefix}.idx").exists():
            write_indexed_dataset(prefix, synthetic_documents(num_docs, vocab_size, eod, seed, kind), vocab_size)
        prefixes.append(str(prefix))
    return prefixes


def prepare_data(config: PretrainConfig, output: Path, vocab_size: int, train_samples: int) -> tuple[Any, Any]:
    """(train, valid) datasets of the config's one data source (collective: rank 0 writes generated data)."""
    import torch.distributed as dist

    data = config.data
    if data.manifest is not None:
        manifest = read_manifest(data.manifest)
        if manifest.vocab_size > vocab_size:  # with_manifest checks on the driver; a rank may be started directly
            raise VocabularyTooLargeError(f"{data.manifest}: {manifest.vocab_size} tokens > embedding {vocab_size}")
        return build_datasets(data, [], vocab_size, train_samples, output / "data" / "cache", manifest=manifest)
    paths = list(data.paths)
    if data.generator == "synthetic":
        if dist.get_rank() == 0:
            write_synthetic_corpus(output / "data", vocab_size, data.eod_token)
        dist.barrier()
        paths = [str(output / "data" / kind) for kind in ("counting", "motif")]
    return build_datasets(data, paths, vocab_size, train_samples, output / "data" / "cache")


def build_datasets(
    data: DataConfig,
    paths: list[str],
    vocab_size: int,
    train_samples: int,
    cache: str | Path,
    manifest: Manifest | None = None,
):
    """(train, valid) datasets of `data.seq_len`-token samples over the mixture of `paths` (split by
    data.split), or over a manifest's own train and valid blends."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if manifest is not None:
        # Megatron's blend_per_split. A manifest without valid documents validates on its train blend.
        valid = manifest.valid if manifest.valid[0] else manifest.train
        splits = [(list(manifest.train[0]), list(manifest.train[1])), (list(valid[0]), list(valid[1])), None]
        blend = {"blend_per_split": splits}
    else:
        blend = {"blend": (list(paths), list(data.weights) if data.weights else None), "split": data.split}
    config = GPTDatasetConfig(
        random_seed=data.seed,
        sequence_length=data.seq_len,
        **blend,
        path_to_cache=str(cache),
        tokenizer=_Tokenizer(vocab_size, data.eod_token),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    valid_samples = max(data.global_batch_size, 8)
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, None], lambda: True, config
    ).build()
    return train, valid


def micro_batch(
    dataset, first_sample: int, micro: int, data: DataConfig, dp_rank: int, dp_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (input_ids, labels) [micro_batch, seq] of accumulation step `micro` on DP rank `dp_rank`, in the
    optimizer step whose global batch starts at sample `first_sample`."""
    per_micro = data.micro_batch_size * dp_size
    first = first_sample + micro * per_micro + dp_rank * data.micro_batch_size
    samples = [dataset[(first + i) % len(dataset)] for i in range(data.micro_batch_size)]
    tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long()
    labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long()
    loss_mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples])
    return tokens, labels.masked_fill(loss_mask == 0, IGNORE_INDEX)
