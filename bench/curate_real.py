"""One side of bench/curate_bench.py --real, run in its own process so its peak memory is its own:

    python bench/curate_real.py looplm|looplm-local|datatrove INPUT_DIR WORK_DIR --cpus 2

Both sides run the same stages on the same JSONL shards: read, ftfy, language ID (the same fastText lid.176
model, FineWeb's English >= 0.65), Gopher repetition, Gopher quality, C4 and FineWeb filters with FineWeb's
settings, MinHash dedup (5-grams, 14 bands x 8 rows, 64-bit), PII (e-mail, IP), and write the kept documents.
looplm also writes its removed documents and report, and runs exact dedup; it does not tokenize (tokenize: false).
`looplm` runs on Ray Data (a local Ray of `--cpus` CPUs), `looplm-local` with `executor: local` (this process and
a pool of `--cpus` workers, no Ray).
Prints one JSON line: {"side", "docs", "kept", "seconds"}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PHASES: dict[str, float] = {}  # looplm's own timer per phase, printed with the result


def run_looplm(inputs: Path, work: Path, cpus: int, executor: str = "ray") -> int:
    from looplm.pipelines.curate import CurateConfig, run
    from looplm.pipelines.curation.checks import YieldConfig
    from looplm.pipelines.sources import SourceConfig

    config = CurateConfig(
        sources=(SourceConfig(name="real", kind="jsonl", path=str(inputs)),),
        tokenize=False,
        progress=False,
        num_cpus=cpus,
        expect=YieldConfig(on_low_yield="warn"),
        executor=executor,
    )
    report = run(config, work / "looplm")
    PHASES.update(report["seconds_per_phase"], pipeline_seconds=report["seconds"])
    return report["documents_kept"]


def _english(doc) -> bool:
    from looplm.pipelines.curation.langid import LangIdConfig, identify, language_verdict

    ((language, score),) = identify([doc.text])
    doc.metadata["language"], doc.metadata["language_score"] = language, score
    return not language_verdict(language, score, LangIdConfig())[0]


def run_datatrove(inputs: Path, work: Path, cpus: int) -> int:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        LambdaFilter,
    )
    from datatrove.pipeline.formatters import FTFYFormatter, PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    tasks = len(list(inputs.glob("*.jsonl")))
    root = work / "datatrove"
    # sha1, not datatrove's default xxhash: datatrove 0.10.1 passes str to xxhash, which xxhash 4 (installed here
    # for `datasets`) refuses. sha1 costs datatrove about 0.3 ms per 4 kB document more: small beside its ~10 ms.
    hashing = HashConfig(precision=64, hash_fc="sha1")
    minhash = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=hashing)

    def stage(pipeline, name, n=tasks, depends=None):
        return LocalPipelineExecutor(
            pipeline=pipeline, tasks=n, workers=cpus, logging_dir=str(root / "logs" / name), depends=depends
        )

    filtering = stage(
        [
            JsonlReader(str(inputs)),
            FTFYFormatter(),
            LambdaFilter(_english),
            GopherRepetitionFilter(),
            GopherQualityFilter(),
            C4QualityFilter(filter_no_terminal_punct=False),
            FineWebQualityFilter(),
            JsonlWriter(str(root / "filtered")),
        ],
        "filter",
    )
    signatures = stage(
        [JsonlReader(str(root / "filtered")), MinhashDedupSignature(str(root / "signatures"), config=minhash)],
        "signatures",
        depends=filtering,
    )
    buckets = stage(
        [MinhashDedupBuckets(str(root / "signatures"), str(root / "buckets"), config=minhash)],
        "buckets",
        n=minhash.num_buckets,
        depends=signatures,
    )
    clusters = stage(
        [MinhashDedupCluster(str(root / "buckets"), str(root / "remove_ids"), config=minhash)],
        "clusters",
        n=1,
        depends=buckets,
    )
    final = stage(
        [
            JsonlReader(str(root / "filtered")),
            MinhashDedupFilter(str(root / "remove_ids")),
            PIIFormatter(),
            JsonlWriter(str(root / "output")),
        ],
        "final",
        depends=clusters,
    )
    final.run()
    return sum(1 for path in (root / "output").glob("*.jsonl.gz") for _ in __import__("gzip").open(path, "rt"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("side", choices=("looplm", "looplm-local", "datatrove"))
    parser.add_argument("inputs", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    docs = sum(1 for path in args.inputs.glob("*.jsonl") for _ in path.open(encoding="utf-8"))
    started = time.perf_counter()
    if args.side == "datatrove":
        kept = run_datatrove(args.inputs, args.work, args.cpus)
    else:
        kept = run_looplm(args.inputs, args.work, args.cpus, "local" if args.side == "looplm-local" else "ray")
    seconds = time.perf_counter() - started
    print(json.dumps({"side": args.side, "docs": docs, "kept": kept, "seconds": round(seconds, 2), "phases": PHASES}))


if __name__ == "__main__":
    main()
