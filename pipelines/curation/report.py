"""The curation report: documents and tokens in and out per step, removal reasons with examples, length and
language histograms (PNG), and precision/recall on planted defects where the corpus carries labels.

Written as report.json and report.md (plus the plots) in the output's report/ folder, and logged to MLflow when
a tracking URI is set.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from looplm.infra.tracking import pyplot
from looplm.pipelines.curation.quality import QUALITY_STEPS

# Steps that remove documents, in pipeline order ("read" is the quarantine of bad input).
REMOVAL_STEPS = (
    "read",
    "langid",
    "langid_score",
    *QUALITY_STEPS,
    "exact_dedup",
    "fuzzy_dedup",
    "decontam",
)
# check -> (the steps that make it, the planted defects it should catch)
CHECKS = {
    "langid": (("langid",), ("foreign_language",)),
    "quality": (QUALITY_STEPS, ("boilerplate", "spam")),
    "exact_dedup": (("exact_dedup",), ("exact_duplicate",)),
    "fuzzy_dedup": (("fuzzy_dedup",), ("near_duplicate",)),
    "decontam": (("decontam",), ("contaminated",)),
}
EDIT_BUCKETS = (0.0, 0.025, 0.05, 0.075, 0.10, 1.0)
# Planted classes that no step should keep; the others are good text, copied or modified.
JUNK = ("boilerplate", "spam", "foreign_language")


def step_table(stats: pd.DataFrame) -> list[dict]:
    """Documents and characters entering and leaving each removal step (characters as read: only kept documents
    are tokenized, so tokens are known for what is kept)."""
    alive = np.ones(len(stats), dtype=bool)
    chars = stats["n_chars"].to_numpy()
    rows = []
    for step in REMOVAL_STEPS:
        removed = (stats["removed_by"] == step).to_numpy()
        rows.append(
            {
                "step": step,
                "docs_in": int(alive.sum()),
                "docs_removed": int(removed.sum()),
                "docs_out": int((alive & ~removed).sum()),
                "chars_in": int(chars[alive].sum()),
                "chars_out": int(chars[alive & ~removed].sum()),
            }
        )
        alive &= ~removed
    return rows


def general_reason(reason: str) -> str:
    """A reason with its particulars taken out (numbers, quoted text, document keys), for grouping."""
    reason = re.sub(r"'[^']*'|\"[^\"]*\"", "'...'", reason)
    reason = re.sub(r"\b(as|of) \S+:\S+", r"\1 <key>", reason)
    return re.sub(r"\b\d+(\.\d+)?%?", "N", reason)


def reason_counts(stats: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Per step, removal reasons with the numbers taken out (so '37 words < 50' and '12 words < 50' group)."""
    removed = stats[stats["removed_by"] != ""]
    general = removed["reason"].map(general_reason)
    result: dict[str, dict[str, int]] = {}
    for (step, reason), count in removed.groupby([removed["removed_by"], general]).size().items():
        result.setdefault(step, {})[reason] = int(count)
    return result


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def planted_scores(stats: pd.DataFrame) -> dict:
    """Precision and recall of each check on the planted defects (empty when no document carries a label)."""
    labeled = stats[stats["planted"] != ""]
    if labeled.empty:
        return {}
    scores: dict = {}
    for check, (steps, defects) in CHECKS.items():
        by_check = labeled["removed_by"].isin(steps)
        caught = by_check & labeled["planted"].isin(defects)
        other_junk = by_check & labeled["planted"].isin(set(JUNK) - set(defects))
        good = int((by_check & ~caught & ~other_junk).sum())
        entry = {
            "steps": list(steps),
            "defects": list(defects),
            "removed": int(by_check.sum()),
            # Strict: only the check's own defects count as correct removals.
            "precision": _ratio(int(caught.sum()), int(by_check.sum())),
            # Junk of another class (boilerplate caught by language ID, say) set aside; good documents
            # (clean, or planted duplicates, PII or contamination of good text) removed stay false positives.
            "precision_excluding_other_junk": _ratio(int(caught.sum()), int(caught.sum()) + good),
            "other_junk_removed": int(other_junk.sum()),
            "good_documents_removed": good,
            "recall": {},
        }
        for defect in defects:
            planted = labeled["planted"] == defect
            elsewhere = labeled[planted & ~by_check & (labeled["removed_by"] != "")]["removed_by"]
            entry["recall"][defect] = {
                "planted": int(planted.sum()),
                "caught": int((planted & by_check).sum()),
                "recall": _ratio(int((planted & by_check).sum()), int(planted.sum())),
                "removed_by_any_step": _ratio(int((planted & (labeled["removed_by"] != "")).sum()), int(planted.sum())),
                "removed_by_other_steps": {k: int(v) for k, v in elsewhere.value_counts().items()},
            }
        scores[check] = entry

    near = labeled[labeled["planted"] == "near_duplicate"]
    if not near.empty:
        fractions = near["meta"].map(lambda m: json.loads(m).get("edit_fraction", 0.0)).to_numpy()
        caught = near["removed_by"].isin(("exact_dedup", "fuzzy_dedup")).to_numpy()
        buckets = []
        for lo, hi in zip(EDIT_BUCKETS[:-1], EDIT_BUCKETS[1:], strict=True):
            inside = (fractions > lo) & (fractions <= hi)
            if inside.any():
                buckets.append({"edit_fraction": f"({lo}, {hi}]", "planted": int(inside.sum()),
                                "recall": _ratio(int((caught & inside).sum()), int(inside.sum()))})  # fmt: skip
        scores["fuzzy_dedup"]["recall_by_edit_fraction"] = buckets

    # PII: planted strings against the strings the redaction step found.
    planted_values = 0
    recovered = 0
    found_total = 0
    found_planted = 0
    reached = labeled[labeled["pii"] != ""]
    for meta, found in zip(reached["meta"], reached["pii"], strict=True):
        truth = {value for _, value in json.loads(meta).get("pii", [])}
        hits = {value for _, value in json.loads(found)}
        planted_values += len(truth)
        recovered += len(truth & hits)
        found_total += len(hits)
        found_planted += len(hits & truth)
    pii_docs = labeled[labeled["planted"] == "pii"]
    missed_docs = int((pii_docs["pii"] == "").sum())  # removed before the PII step, so never redacted
    scores["pii"] = {
        "planted_strings": planted_values,
        "redacted_planted": recovered,
        "recall": _ratio(recovered, planted_values),
        "redactions": found_total,
        "precision": _ratio(found_planted, found_total),
        "pii_docs_not_reaching_pii_step": missed_docs,
    }
    return scores


def plot_lengths(stats: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    lengths = stats["n_chars"].clip(lower=1).to_numpy()
    kept = lengths[(stats["removed_by"] == "").to_numpy()]
    bins = np.logspace(np.log10(lengths.min()), np.log10(max(10, lengths.max())) + 0.1, 50)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lengths, bins=bins, alpha=0.6, label=f"read ({len(lengths)})")
    ax.hist(kept, bins=bins, alpha=0.6, label=f"kept ({len(kept)})")
    ax.set_xscale("log")
    ax.set_xlabel("document length (characters)")
    ax.set_ylabel("documents")
    ax.legend()
    ax.set_title("Document lengths")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_languages(stats: pd.DataFrame, path: Path, top: int = 15) -> None:
    plt = pyplot()
    counts = stats.loc[stats["lang"] != "", "lang"].value_counts().head(top)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(counts.index.astype(str), counts.to_numpy())
    ax.set_yscale("log")
    ax.set_xlabel("language (fastText lid.176)")
    ax.set_ylabel("documents")
    ax.set_title("Languages identified")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_report(stats: pd.DataFrame, examples: dict[str, list[dict]], extra: dict) -> dict:
    return {
        "documents_read": int(len(stats)),
        "documents_kept": int((stats["removed_by"] == "").sum()),
        "quarantined": int((stats["removed_by"] == "read").sum()),
        "tokens_kept": int(stats.loc[stats["removed_by"] == "", "n_tokens"].sum()),
        "steps": step_table(stats),
        "reasons": reason_counts(stats),
        "examples": examples,
        "planted": planted_scores(stats),
        **extra,
    }


def _markdown(report: dict) -> str:
    lines = ["# Curation report", ""]
    lines += [f"**WARNING:** {message}" for message in report.get("warnings", [])]
    decontam = report.get("decontam", {})
    lines += [
        "",
        f"Read {report['documents_read']} documents, kept {report['documents_kept']} "
        f"({report['tokens_kept']} tokens); quarantined {report['quarantined']} as bad input. Decontaminated "
        f"against {decontam.get('eval_texts')} evaluation texts (builtin_eval={decontam.get('builtin_eval')}, "
        f"eval_files={decontam.get('eval_files')}).",
        "",
        "| step | docs in | removed | docs out | chars in | chars out |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["steps"]:
        lines.append(
            f"| {row['step']} | {row['docs_in']} | {row['docs_removed']} | {row['docs_out']} | "
            f"{row['chars_in']} | {row['chars_out']} |"
        )
    if report.get("modified"):
        lines += ["", "Documents modified in place: " + ", ".join(f"{k} {v}" for k, v in report["modified"].items())]
    lines += ["", "## Removal reasons", ""]
    for step, reasons in report["reasons"].items():
        for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
            label = reason if reason.startswith(step) else f"{step}: {reason}"
            lines.append(f"- {label} ({count})")
    if report["planted"]:
        lines += ["", "## Planted defects", ""]
        lines.append(
            "| check | defect | planted | caught | recall | removed by any step | precision "
            "| precision, other junk set aside |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for check, entry in report["planted"].items():
            if check == "pii":
                continue
            for defect, rec in entry["recall"].items():
                lines.append(
                    f"| {check} | {defect} | {rec['planted']} | {rec['caught']} | {rec['recall']} | "
                    f"{rec['removed_by_any_step']} | {entry['precision']} | {entry['precision_excluding_other_junk']} |"
                )
        pii = report["planted"]["pii"]
        lines.append(
            f"| pii | pii strings | {pii['planted_strings']} | {pii['redacted_planted']} | {pii['recall']} | | "
            f"{pii['precision']} | |"
        )
        buckets = report["planted"].get("fuzzy_dedup", {}).get("recall_by_edit_fraction", [])
        if buckets:
            lines += ["", "Near-duplicate recall by edit fraction: "]
            lines += [f"- {b['edit_fraction']}: {b['recall']} of {b['planted']}" for b in buckets]
    lines += ["", "## Examples of removed documents", ""]
    for step, items in report["examples"].items():
        for item in items:
            excerpt = item["text"][:200].replace("\n", " ")
            lines.append(f"- **{step}** `{item['id']}`: {item['reason']} — {excerpt!r}")
    lines += ["", "![lengths](lengths.png)", "", "![languages](languages.png)", ""]
    return "\n".join(lines)


def write_report(folder: Path, report: dict, stats: pd.DataFrame) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    plot_lengths(stats, folder / "lengths.png")
    plot_languages(stats, folder / "languages.png")
    (folder / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (folder / "report.md").write_text(_markdown(report))
    return folder


def report_metrics(report: dict) -> dict[str, float]:
    """The report's counts and planted-defect scores as flat MLflow metrics."""
    metrics = {"documents_read": report["documents_read"], "documents_kept": report["documents_kept"]}
    metrics["quarantined"] = report["quarantined"]
    metrics["tokens_kept"] = report["tokens_kept"]
    for row in report["steps"]:
        metrics[f"removed_{row['step']}"] = row["docs_removed"]
    for check, entry in report["planted"].items():
        if entry.get("precision") is not None:
            metrics[f"{check}_precision"] = entry["precision"]
        if check == "pii":
            if entry["recall"] is not None:
                metrics["pii_recall"] = entry["recall"]
            continue
        for defect, rec in entry["recall"].items():
            if rec["recall"] is not None:
                metrics[f"{defect}_recall"] = rec["recall"]
    return metrics


def log_to_mlflow(folder: Path, report: dict, config: Any, tracking_uri: str) -> str:
    """One tracked run (looplm.infra.tracking: no global MLflow state is touched) with the config as params, the
    counts and scores as metrics and the report folder as artifacts; returns the run id."""
    from looplm.infra.tracking import pipeline_run

    with pipeline_run("curate", config=config, experiment="looplm-curate", tracking_uri=tracking_uri) as run:
        run.log_metrics(report_metrics(report))
        for path in sorted(folder.iterdir()):
            run.log_artifact(path, "curation_report")
    return run.run_id
