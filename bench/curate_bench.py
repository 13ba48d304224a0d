"""Curation throughput. Two modes:

    python bench/curate_bench.py --real CORPUS [--docs 2000 --rounds 2 --cpus 2]
    python bench/curate_bench.py --docs 100000 --cpus 2          # GENERATED documents

--real: looplm, on Ray Data and with its local executor (no Ray), and datatrove 0.10.1 side by side on real text (a
folder from `bench/real_corpus.py corpus`), the same stages on the same shards (bench/curate_real.py), each run in
its own process, interleaved (the order alternates each round), timed end to end (Ray or datatrove's executor start
included) with the peak memory of the whole process tree (PSS, so shared memory counts once) and each process's
share at that peak. Prints each run and the ratios of the medians, each looplm executor against datatrove.

Without --real: the generated corpus (web-like pages with planted defects, not real text; its figures are
labelled as such in BENCHMARKS.md):
Not a test: the figures go to BENCHMARKS.md. Per-step and MinHash figures are single-core, in process, on a
sample; the pipeline figure is end to end (generation, every step, tokenizer training, packing, report) on a
local Ray with `--cpus` CPUs, reported per core.
"""

from __future__ import annotations

import argparse
import contextlib
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
        ("normalize", lambda b: c.normalize_stage(b, config.input, skips)),
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


def _tree_pss(root) -> list[tuple[str, int]]:
    """(name, proportional set size in bytes) of a process and each of its descendants (vanished ones left out).
    The name is Ray's process title (ray::_StatsActor, ray::IDLE, ...), the script a Python process runs, or, for
    the local executor's processes, forkserver and its pool workers."""
    import psutil

    rows = []
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            command = proc.cmdline()
            script = next((os.path.basename(a) for a in command[1:3] if a.endswith(".py")), None)
            name = command[0] if command and command[0].startswith("ray::") else script or proc.name()
            if any("multiprocessing.forkserver" in a for a in command):  # the workers fork from the server
                name = "forkserver" if proc.ppid() == root.pid else "pool worker"
            rows.append((name, proc.memory_full_info().pss))
    return rows


def run_side(side: str, inputs: str, work: str, cpus: int, env: dict) -> dict:
    """One run of bench/curate_real.py in its own process, sampling its process tree's memory every 0.5 s."""
    import json
    import subprocess
    import sys

    import psutil

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "curate_real.py")
    command = [sys.executable, script, side, inputs, work, "--cpus", str(cpus)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    root, peak, at_peak = psutil.Process(proc.pid), 0, []
    while proc.poll() is None:
        rows = _tree_pss(root)
        if sum(pss for _, pss in rows) > peak:
            peak, at_peak = sum(pss for _, pss in rows), rows
        time.sleep(0.5)
    out = proc.stdout.read().strip().splitlines()
    if proc.returncode != 0 or not out:
        return {"side": side, "failed": proc.returncode}
    processes = [f"{name} {pss / 2**20:.0f}" for name, pss in sorted(at_peak, key=lambda row: -row[1])]
    return {**json.loads(out[-1]), "peak_bytes": peak, "processes_at_peak_mib": processes}


def real(args) -> None:
    import json
    import shutil
    import statistics
    import subprocess
    from pathlib import Path

    inputs = Path(tempfile.mkdtemp(prefix="curate-real-in-"))
    records = []
    for path in sorted(Path(args.real).glob("part-*.jsonl")):
        records += path.read_text(encoding="utf-8").splitlines()
        if len(records) >= args.docs:
            break
    records = records[: args.docs]
    shard = 250  # datatrove runs a task per file; looplm's reader a task per file too
    for n, start in enumerate(range(0, len(records), shard)):
        (inputs / f"part-{n:05d}.jsonl").write_text("\n".join(records[start : start + shard]) + "\n")
    cases = [("looplm", {}), ("looplm-local", {}), ("datatrove", {})]
    if args.nice15:  # Ray's default worker niceness, to show what it costs on a loaded machine
        cases.append(("looplm", {"RAY_worker_niceness": "15"}))
    runs = []
    for round_ in range(args.rounds):
        order = cases if round_ % 2 == 0 else cases[::-1]
        for side, extra in order:
            work = tempfile.mkdtemp(prefix=f"curate-real-{side}-")
            load = os.getloadavg()[0]
            result = run_side(side, str(inputs), work, args.cpus, {**os.environ, **extra})
            result["case"] = side + (" (workers nice 15)" if extra else "")
            result["load"] = round(load, 1)
            runs.append(result)
            print(json.dumps(result), flush=True)
            shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(inputs, ignore_errors=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\n## Curation on real text: looplm (Ray Data; local executor) vs datatrove 0.10.1 ({len(records)} "
          f"documents from {args.real}, {args.cpus} CPUs, {args.rounds} interleaved rounds, commit {commit}, "
          f"os.cpu_count()={os.cpu_count()})\n")  # fmt: skip
    print("| case | runs | docs/s (median) | seconds (median) | peak memory, PSS (median) | kept | load avg at start |")
    print("|---|---|---|---|---|---|---|")
    medians = {}
    for case in dict.fromkeys(r["case"] for r in runs):
        done = [r for r in runs if r["case"] == case and "seconds" in r]
        failed = sum(1 for r in runs if r["case"] == case and "failed" in r)
        if not done:
            print(f"| {case} | {failed} failed | | | | | |")
            continue
        seconds = statistics.median(r["seconds"] for r in done)
        peak = statistics.median(r["peak_bytes"] for r in done)
        medians[case] = (done[0]["docs"] / seconds, peak)
        loads = ", ".join(str(r["load"]) for r in done)
        print(f"| {case} | {len(done)}{f' (+{failed} failed)' if failed else ''} | {done[0]['docs'] / seconds:.1f} | "
              f"{seconds:.1f} | {peak / 2**30:.2f} GiB | {done[0]['kept']} | {loads} |")  # fmt: skip
    if "datatrove" in medians:
        theirs, their_peak = medians["datatrove"]
        print()
        for case, (ours, our_peak) in medians.items():
            if case.startswith("looplm"):
                print(f"{case} / datatrove: docs/s {ours / theirs:.2f}x, peak memory {our_peak / their_peak:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--real", default=None, help="corpus folder (bench/real_corpus.py): vs datatrove")
    parser.add_argument("--rounds", type=int, default=2, help="--real: interleaved rounds")
    parser.add_argument("--nice15", action="store_true", help="--real: also run looplm with Ray's nice-15 workers")
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--sample", type=int, default=5000, help="documents for the single-core step timings")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if args.real:
        return real(args)

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
