"""Curation throughput: the whole pipeline on Ray Data, each per-document step alone, and MinHash dedup alone
(ours in numpy against datasketch's), on generated documents with planted defects. Prints a table.

    python bench/curate_bench.py --docs 100000 --cpus 2

Not a test: the figures go to BENCHMARKS.md. Per-step and MinHash figures are single-core, in process, on a
sample; the pipeline figure is end to end (generation, every step, tokenizer training, packing, report) on a
local Ray with `--cpus` CPUs, reported per core.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import pandas as pd


def corpus_config(docs: int, cpus: int):
    """The demo's mix scaled to about `docs` documents read: 80% web-like pages (with planted defects, about
    17% more documents than clean pages), 10% multi-hop, 10% Mano."""
    from looplm.pipelines.curate import CurateConfig
    from looplm.pipelines.noise import NoiseConfig
    from looplm.pipelines.sources import SourceConfig

    sources = (
        SourceConfig(name="bios", kind="bios", count=int(0.8 * docs / 1.17), noise=NoiseConfig(), weight=0.6),
        SourceConfig(
            name="multihop",
            kind="multihop",
            count=max(1, int(0.1 * docs) - 400),
            weight=0.3,
            skip=("langid", "quality"),
        ),  # fmt: skip
        SourceConfig(name="mano", kind="mano", count=int(0.1 * docs), weight=0.1, skip=("langid", "quality", "pii")),
    )
    return CurateConfig(sources=sources, num_cpus=cpus, progress=False, builtin_eval=True)


def per_step(sample: pd.DataFrame, config) -> list[tuple[str, float]]:
    """Microseconds per document of each per-document stage, single core, in process."""
    from looplm.pipelines import curate as c
    from looplm.pipelines.curation.decontam import EvalIndex

    skips = c.skip_table(config.sources)
    index = EvalIndex(c.eval_texts(config), config.decontam.n_gram)
    c.langid_stage(sample.head(10).pipe(c.validate_stage, config.input), config.langid, skips)  # load the model
    stages = [
        ("validate", lambda b: c.validate_stage(b, config.input)),
        ("normalize", lambda b: c.normalize_stage(b, skips)),
        ("langid", lambda b: c.langid_stage(b, config.langid, skips)),
        ("quality (4 filters)", lambda b: c.quality_stage(b, config.quality, skips)),
        ("hash + minhash", lambda b: c.hash_stage(b, config.minhash, skips)),
        ("pii", lambda b: c.pii_stage(b.drop(columns=["content_hash", "band_keys"]), config.pii, skips)),
        ("decontam", lambda b: c.decontam_stage(b, index, skips)),
    ]
    timings = []
    batch = sample
    for name, stage in stages:
        started = time.perf_counter()
        batch = stage(batch)
        timings.append((name, (time.perf_counter() - started) / len(sample) * 1e6))
    return timings


def minhash_bench(texts: list[str]) -> list[tuple[str, float]]:
    """Signatures (112 hashes of word 5-gram shingles) per document: ours against datasketch's, same shingles."""
    from looplm.pipelines.curation.dedup import MinHashConfig, MinHasher, duplicate_clusters, simplify

    hasher = MinHasher(MinHashConfig())
    started = time.perf_counter()
    signatures, _ = hasher.signatures(texts)
    ours = (time.perf_counter() - started) / len(texts) * 1e6
    started = time.perf_counter()
    duplicate_clusters(hasher.band_keys(signatures))
    clusters = (time.perf_counter() - started) / len(texts) * 1e6
    results = [("ours: signatures (numpy)", ours), ("ours: band keys + connected components", clusters)]
    try:
        from datasketch import MinHash
    except ImportError:
        return results + [("datasketch: not installed", float("nan"))]
    sample = texts[: min(len(texts), 5000)]
    started = time.perf_counter()
    for text in sample:
        words = simplify(text)
        shingles = {" ".join(words[i : i + 5]).encode() for i in range(max(1, len(words) - 4))}
        MinHash(num_perm=112, seed=1).update_batch(list(shingles))
    results.append(("datasketch 2.0: MinHash.update_batch", (time.perf_counter() - started) / len(sample) * 1e6))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--sample", type=int, default=5000, help="documents for the single-core step timings")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    from looplm.pipelines.curate import run
    from looplm.pipelines.sources import COLUMNS, generated_records

    config = corpus_config(args.docs, args.cpus)
    frame = pd.DataFrame(generated_records(config.sources[0], config.seed), columns=list(COLUMNS))
    sample = frame.sample(n=min(args.sample, len(frame)), random_state=0).reset_index(drop=True)
    steps = per_step(sample, config)
    minhash = minhash_bench(frame["text"].head(20_000).tolist())

    output = args.output or tempfile.mkdtemp(prefix="curate-bench-")
    started = time.perf_counter()
    report = run(config, output)
    wall = time.perf_counter() - started
    docs = report["documents_read"]

    print(f"\n## Curation benchmark ({docs} documents read, {args.cpus} CPUs, os.cpu_count()={os.cpu_count()})\n")
    print("| what | figure |")
    print("|---|---|")
    print(f"| whole pipeline, wall (incl. Ray start, generation, tokenizer, packing, report) | {wall:.1f} s |")
    print(f"| whole pipeline, documents/s | {docs / wall:.0f} |")
    print(f"| whole pipeline, documents/s per core | {docs / wall / args.cpus:.0f} |")
    print(f"| pipeline's own timer (excl. Ray start) | {report['seconds']} s |")
    for phase, seconds in report["seconds_per_phase"].items():
        print(f"| phase: {phase} | {seconds} s |")
    for name, us in steps:
        print(f"| step alone, 1 core: {name} | {us:.0f} us/doc ({1e6 / us:.0f} docs/s) |")
    for name, us in minhash:
        print(f"| MinHash, 1 core: {name} | {us:.0f} us/doc ({1e6 / us:.0f} docs/s) |" if us == us else f"| {name} |")
    planted = report["planted"]
    if planted:
        print("\n| check | defect | planted | recall | precision | precision, other junk set aside |")
        print("|---|---|---|---|---|---|")
        for check, entry in planted.items():
            if check == "pii":
                print(f"| pii | strings | {entry['planted_strings']} | {entry['recall']} | {entry['precision']} | |")
                continue
            for defect, rec in entry["recall"].items():
                print(f"| {check} | {defect} | {rec['planted']} | {rec['recall']} | {entry['precision']} | "
                      f"{entry['precision_excluding_other_junk']} |")  # fmt: skip
        for bucket in planted["fuzzy_dedup"].get("recall_by_edit_fraction", []):
            print(f"| fuzzy_dedup | near-duplicates, edits {bucket['edit_fraction']} | {bucket['planted']} | "
                  f"{bucket['recall']} | | |")  # fmt: skip
    print(f"\noutput: {output}")


if __name__ == "__main__":
    main()
