"""Training data through Megatron's indexed datasets: GPTDataset samples, blended by mixture weights.

`build_datasets` returns the train and valid splits (BlendedMegatronDatasetBuilder over GPTDataset); a sample's
index is a pure function of (samples consumed before the optimizer step, accumulation step, DP rank, position),
and the samples consumed are a function of the step, so the data position of a resumed run is its step.
`write_indexed_dataset` writes a `.bin`/`.idx` pair; `write_synthetic_corpus` makes a small learnable mixture
for CPU runs and tests until the curation step provides real data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from looplm.model.objectives import IGNORE_INDEX

from .config import DataConfig


class _Tokenizer:
    """The attributes GPTDataset reads from a tokenizer (documents are already token ids)."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size, self.eod, self.pad, self.bos = vocab_size, eod, -1, None
        self.unique_identifiers = {"class": "looplm", "vocab_size": vocab_size, "eod": eod}


def write_indexed_dataset(prefix: str | Path, documents: Iterable[Sequence[int]], vocab_size: int) -> Path:
    """Write documents (lists of token ids, each already ending in its EOD) as prefix.bin / prefix.idx."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32 if vocab_size > 65535 else np.uint16)
    for doc in documents:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(f"{prefix}.idx")
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


def build_datasets(data: DataConfig, paths: list[str], vocab_size: int, train_samples: int, cache: str | Path):
    """(train, valid) datasets of `data.seq_len`-token samples over the mixture of `paths`."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    weights = list(data.weights) if data.weights else None
    config = GPTDatasetConfig(
        random_seed=data.seed,
        sequence_length=data.seq_len,
        blend=(list(paths), weights),
        split=data.split,
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
