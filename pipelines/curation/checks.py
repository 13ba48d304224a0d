"""What a curation run must hold to be marked done, checked on the driver from the per-document table.

- Yield: a source that reads no documents, keeps none, or keeps less than `min_kept_fraction` of what it read
  (a wrong `text_field` quarantines everything; a filter set for another kind of text removes everything) is a
  problem. `on_low_yield: error` (the default) fails the run before anything is tokenized, with the report
  written and no `_SUCCESS`; `warn` prints the problem loudly, records it in the report and finishes.
- Id collisions: documents of one source that share an id. Keys are unique regardless (the reader makes them,
  see `sources`), so no document is lost to a collision; the collision is reported, since ids that repeat
  usually mean two files of one dump or a wrong `id_field`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pandas as pd

ON_LOW_YIELD = ("error", "warn")


class LowYieldError(RuntimeError):
    """A curation run kept nothing, or far less than its config expects; the message names the source."""


@dataclass(frozen=True)
class YieldConfig:
    min_kept_fraction: float = 0.0  # per source; below it is a problem (0: only keeping nothing is)
    on_low_yield: str = "error"  # error: fail, no _SUCCESS; warn: print, record in the report, finish

    def __post_init__(self) -> None:
        if self.on_low_yield not in ON_LOW_YIELD:
            raise ValueError(f"expect.on_low_yield must be one of {ON_LOW_YIELD}, got {self.on_low_yield!r}")
        if not 0.0 <= self.min_kept_fraction <= 1.0:
            raise ValueError(f"expect.min_kept_fraction must be in [0, 1], got {self.min_kept_fraction}")


def _top_reasons(removed: pd.DataFrame, n: int = 2) -> str:
    counts = removed.groupby(["removed_by", "reason"]).size().sort_values(ascending=False).head(n)
    return "; ".join(f"{step}: {reason} ({count})" for (step, reason), count in counts.items())


def yield_problems(stats: pd.DataFrame, sources: list[str], config: YieldConfig) -> list[str]:
    """One line per source that read nothing, kept nothing or kept too little, naming the main reasons."""
    problems = []
    for source in sources:
        rows = stats[stats["source"] == source]
        kept = int((rows["removed_by"] == "").sum())
        if rows.empty:
            problems.append(f"source {source!r} read no documents")
        elif kept == 0 or kept / len(rows) < config.min_kept_fraction:
            what = "none" if kept == 0 else f"{kept} ({kept / len(rows):.1%}, below expect.min_kept_fraction " \
                f"{config.min_kept_fraction})"  # fmt: skip
            reasons = _top_reasons(rows[rows["removed_by"] != ""])
            problems.append(f"source {source!r} kept {what} of {len(rows)} documents read; mostly removed by {reasons}")
    return problems


def id_collisions(stats: pd.DataFrame, examples: int = 3) -> dict[str, dict]:
    """{source: {documents, ids, examples}} for sources where documents share an id."""
    found = {}
    for source, group in stats.groupby("source", sort=True):
        counts = group["id"].value_counts()
        repeated = counts[counts > 1]
        if len(repeated):
            found[str(source)] = {
                "documents": int(repeated.sum()),
                "ids": int(len(repeated)),
                "examples": [str(i) for i in repeated.index[:examples]],
            }
    return found


def warn(message: str) -> None:
    print(f"\nWARNING (curate): {message}\n", file=sys.stderr, flush=True)
