"""The aggregate of a study's runs: mean and spread over seeds, confidence intervals of gaps between models, plots.

    report = aggregate(runs)                       # runs: one dict per model and seed (StudyRunResult's fields)
    gap = welch_interval(a, b, confidence=0.95)    # difference of means, Welch's t interval

Design choices:
- A model's headline is its exact match at its own trained T (a looped k x T model at T passes, a k x 1 model at one
  pass); the per-pass curves give every model at 1..max_passes passes.
- Seeds of different models are independent samples (a seed does not pair two architectures: their inits differ),
  so the gap's interval is Welch's unequal-variance t interval on the difference of means, the t quantile from
  scipy. With one seed on either side there is no spread to estimate and the interval is undefined (NaN).
- The spread shown is the sample standard deviation over seeds (ddof = 1).
- Plots are matplotlib PNGs (Agg backend), written into the report's folder and logged to MLflow by the caller.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from looplm.infra.tracking import pyplot


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std


def welch_interval(a: list[float], b: list[float], confidence: float = 0.95) -> dict[str, float]:
    """mean(a) - mean(b) with Welch's t confidence interval: {gap, low, high, se, df, n_a, n_b}."""
    from scipy.stats import t as student_t

    gap = sum(a) / len(a) - sum(b) / len(b)
    out = {"gap": gap, "low": math.nan, "high": math.nan, "se": math.nan, "df": math.nan, "n_a": len(a), "n_b": len(b)}
    if len(a) < 2 or len(b) < 2:
        return out
    va, vb = mean_std(a)[1] ** 2 / len(a), mean_std(b)[1] ** 2 / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return {**out, "low": gap, "high": gap, "se": 0.0}
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(student_t.ppf((1.0 + confidence) / 2.0, df)) * se
    return {**out, "low": gap - half, "high": gap + half, "se": se, "df": df}


def at_trained(run: dict[str, Any], metric: str = "exact_match") -> float:
    return run[metric][run["total_ut_steps"] - 1]


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model (in first-seen order): seeds, T, layers, parameters, and mean/std per pass of each metric."""
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_model[run["model"]].append(run)
    models: dict[str, dict[str, Any]] = {}
    for name, group in by_model.items():
        group = sorted(group, key=lambda r: r["seed"])
        first = group[0]
        entry: dict[str, Any] = {
            "seeds": [r["seed"] for r in group],
            "num_layers": first["num_layers"],
            "total_ut_steps": first["total_ut_steps"],
            "parameters": first["parameters"],
            "flops_by_pass": first["flops_by_pass"],
            "at_trained": dict(zip(("mean", "std"), mean_std([at_trained(r) for r in group]), strict=True)),
            "train_seconds": sum(r["train_seconds"] for r in group),
        }
        for metric in ("exact_match", "train_exact_match", "val_loss"):
            columns = list(zip(*(r[metric] for r in group), strict=True)) if group[0][metric] else []
            stats = [mean_std(list(c)) for c in columns]
            entry[metric] = {"mean": [s[0] for s in stats], "std": [s[1] for s in stats]}
        entry["exit_curves"] = _mean_curves([r["exit_curves"] for r in group])
        entry["kv"] = _mean_kv([r["kv"] for r in group])
        models[name] = entry
    return models


def _mean_curves(curves: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Exit-curve points averaged over seeds, matched by (policy, gate, index within that policy and gate).
    The hidden-difference thresholds are quantiles of each model's own distances, so they match by index."""
    if not curves or not curves[0]:
        return []
    grouped: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for points in curves:
        seen: dict[tuple[str, str], int] = defaultdict(int)
        for point in points:
            key = (point["policy"], point["gate"])
            grouped[(*key, seen[key])].append(point)
            seen[key] += 1
    out = []
    for (policy, gate, _), points in grouped.items():
        avg = mean_std([p["avg_steps"] for p in points])[0]
        em, em_std = mean_std([p["exact_match"] for p in points])
        threshold = mean_std([p["threshold"] for p in points])[0]
        out.append(
            {"policy": policy, "gate": gate, "threshold": threshold, "avg_steps": avg, "exact_match": em,
             "exact_match_std": em_std, "seeds": len(points)}
        )  # fmt: skip
    return out


def _mean_kv(kvs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    if not kvs or not kvs[0]:
        return {}
    return {
        strategy: {key: mean_std([kv[strategy][key] for kv in kvs])[0] for key in kvs[0][strategy]}
        for strategy in kvs[0]
    }


def gaps(runs: list[dict[str, Any]], pairs: list[tuple[str, str]], confidence: float) -> dict[str, dict[str, float]]:
    """For each (a, b): exact match of a at its trained T minus b at its trained T, over seeds, with a CI."""
    by_model: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        by_model[run["model"]].append(at_trained(run))
    out = {}
    for a, b in pairs:
        missing = [m for m in (a, b) if m not in by_model]
        if missing:
            known = ", ".join(by_model)
            raise ValueError(f"gap {a} - {b}: the study has no model {', '.join(missing)}; models: {known}")
        out[f"{a}-{b}"] = welch_interval(by_model[a], by_model[b], confidence)
    return out


# ---------------------------------------------------------------- plots


def _passes(entry: dict[str, Any]) -> list[int]:
    return list(range(1, len(entry["exact_match"]["mean"]) + 1))


def plot_by_pass(models: dict[str, dict[str, Any]], metric: str, label: str):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, entry in models.items():
        mean, std = entry[metric]["mean"], entry[metric]["std"]
        if not mean:
            continue
        passes = list(range(1, len(mean) + 1))
        spread = [0.0 if math.isnan(s) else s for s in std]
        line = ax.errorbar(passes, mean, yerr=spread, marker="o", capsize=3, label=f"{name} ({_shape(entry)})")
        trained = entry["total_ut_steps"]
        ax.plot([trained], [mean[trained - 1]], "*", markersize=14, color=line[0].get_color())
    ax.set_xlabel("recurrent passes at evaluation")
    ax.set_ylabel(label)
    ax.set_xticks(range(1, max(len(e[metric]["mean"]) for e in models.values()) + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{label} by pass (mean ± std over seeds; ★ = trained T)")
    fig.tight_layout()
    return fig


def plot_compute_quality(models: dict[str, dict[str, Any]]):
    """Held-out exact match against forward compute per token, each model at 1..max_passes passes."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, entry in models.items():
        flops = [f / 1e6 for f in entry["flops_by_pass"]]
        (line,) = ax.plot(flops, entry["exact_match"]["mean"], "o-", label=f"{name} ({_shape(entry)})")
        trained = entry["total_ut_steps"]
        ax.plot([flops[trained - 1]], [entry["exact_match"]["mean"][trained - 1]], "*", markersize=14,
                color=line.get_color())  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("forward MFLOPs per token (passes x layers)")
    ax.set_ylabel("held-out exact match")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Compute against quality: every model at 1..max passes (★ = trained T)")
    fig.tight_layout()
    return fig


def plot_early_exit(name: str, entry: dict[str, Any]):
    """Average passes at the answer token against exact match, per exit rule (mean over seeds)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    series = (
        ("static depth", "static", "", "s-"),
        ("Q-exit, Stage II gate", "qexit", "stage2", "o-"),
        ("Q-exit, Stage I gate", "qexit", "stage1", "^--"),
        ("hidden-state difference", "hdiff", "", "d:"),
    )
    for label, policy, gate, style in series:
        points = sorted(
            (p for p in entry["exit_curves"] if p["policy"] == policy and p["gate"] == gate),
            key=lambda p: p["avg_steps"],
        )
        if points:
            ax.plot([p["avg_steps"] for p in points], [p["exact_match"] for p in points], style, label=label)
    ax.set_xlabel("average recurrent passes at the answer token")
    ax.set_ylabel("held-out exact match")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Early exit against static exit: {name} ({_shape(entry)}), mean over seeds")
    fig.tight_layout()
    return fig


def plot_kv_sharing(models: dict[str, dict[str, Any]]):
    """Per model with a KV measurement: the NLL of each strategy's own greedy continuations (full recomputation) and
    their token agreement with `per_step`, mean over seeds."""
    plt = pyplot()
    measured = {name: entry["kv"] for name, entry in models.items() if entry["kv"]}
    strategies = list(next(iter(measured.values())))
    fig, (ax_nll, ax_agree) = plt.subplots(1, 2, figsize=(10, 4.2))
    width = 0.8 / len(strategies)
    for i, strategy in enumerate(strategies):
        xs = [m + (i - (len(strategies) - 1) / 2) * width for m in range(len(measured))]
        ax_nll.bar(xs, [kv[strategy]["nll"] for kv in measured.values()], width, label=strategy)
        ax_agree.bar(xs, [kv[strategy]["agreement"] for kv in measured.values()], width, label=strategy)
    for ax in (ax_nll, ax_agree):
        ax.set_xticks(range(len(measured)), [f"{name} ({_shape(models[name])})" for name in measured], fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    ax_nll.legend(fontsize=8)
    ax_nll.set_yscale("log")
    ax_nll.set_ylabel("NLL of its own continuations (nats/token)")
    ax_nll.set_title("Decoding quality by KV cache")
    ax_agree.set_ylim(0, 1.05)
    ax_agree.set_ylabel("token agreement with per_step")
    ax_agree.set_title("Same tokens as per_step (greedy)")
    fig.suptitle("KV sharing at decode time, mean over seeds")
    fig.tight_layout()
    return fig


def _shape(entry: dict[str, Any]) -> str:
    return f"{entry['num_layers']}⊗{entry['total_ut_steps']}"


def write_plots(models: dict[str, dict[str, Any]], folder: Path) -> list[Path]:
    plt = pyplot()
    figures = {
        "exact_match_by_pass.png": plot_by_pass(models, "exact_match", "held-out exact match"),
        "val_loss_by_pass.png": plot_by_pass(models, "val_loss", "held-out loss (nats/token)"),
        "compute_quality.png": plot_compute_quality(models),
    }
    for name, entry in models.items():
        if entry["exit_curves"]:
            figures[f"early_exit_{name}.png"] = plot_early_exit(name, entry)
    if any(entry["kv"] for entry in models.values()):
        figures["kv_sharing.png"] = plot_kv_sharing(models)
    paths = []
    for file, figure in figures.items():
        path = folder / file
        figure.savefig(path, format="png", dpi=110, bbox_inches="tight")
        paths.append(path)
    plt.close("all")
    return paths


# ---------------------------------------------------------------- the tables


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def markdown(models: dict[str, dict[str, Any]], gap_table: dict[str, dict[str, float]], confidence: float) -> str:
    lines = ["## Held-out exact match by recurrent pass (mean ± std over seeds)", ""]
    width = max(len(e["exact_match"]["mean"]) for e in models.values())
    lines.append("| model | shape | params | seeds | " + " | ".join(f"t={t}" for t in range(1, width + 1)) + " |")
    lines.append("|---" * (4 + width) + "|")
    for name, e in models.items():
        cells = [_fmt(m, s) for m, s in zip(e["exact_match"]["mean"], e["exact_match"]["std"], strict=True)]
        lines.append(f"| {name} | {_shape(e)} | {e['parameters']:,} | {len(e['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "## Held-out loss by recurrent pass (nats/token, mean over seeds)", ""]
    lines.append("| model | " + " | ".join(f"t={t}" for t in range(1, width + 1)) + " |")
    lines.append("|---" * (1 + width) + "|")
    for name, e in models.items():
        lines.append(f"| {name} | " + " | ".join(f"{m:.4f}" for m in e["val_loss"]["mean"]) + " |")
    if any(e["train_exact_match"]["mean"] for e in models.values()):
        lines += ["", "## Training questions: exact match at the trained T (memorisation)", ""]
        for name, e in models.items():
            if e["train_exact_match"]["mean"]:
                t = e["total_ut_steps"]
                memorised = e["train_exact_match"]
                lines.append(f"- {name}: {_fmt(memorised['mean'][t - 1], memorised['std'][t - 1])}")
    if gap_table:
        lines += ["", f"## Gaps at each model's trained T ({confidence:.0%} Welch t interval over seeds)", ""]
        lines += ["| gap | difference | interval | seeds |", "|---|---|---|---|"]
        for key, g in gap_table.items():
            interval = f"[{g['low']:+.3f}, {g['high']:+.3f}]"
            lines.append(f"| {key} | {g['gap']:+.3f} | {interval} | {g['n_a']} vs {g['n_b']} |")
    for name, e in models.items():
        if e["exit_curves"]:
            lines += ["", f"## Early exit on {name} (answer token; mean over seeds)", ""]
            lines += ["| rule | gate | threshold | avg passes | exact match |", "|---|---|---|---|---|"]
            for p in e["exit_curves"]:
                lines.append(
                    f"| {p['policy']} | {p['gate'] or '-'} | {p['threshold']:.3g} | {p['avg_steps']:.2f} | "
                    f"{_fmt(p['exact_match'], p['exact_match_std'])} |"
                )
        if e["kv"]:
            lines += ["", f"## KV sharing on {name} (greedy, mean over seeds)", ""]
            lines += [
                "| strategy | NLL | NLL gap to per_step | token agreement | first divergence |",
                "|---|---|---|---|---|",
            ]
            for strategy, kv in e["kv"].items():
                lines.append(
                    f"| {strategy} | {kv['nll']:.4f} | {kv['nll_gap']:+.2%} | {kv['agreement']:.2%} | "
                    f"{kv['first_divergence']:.1f} |"
                )
    return "\n".join(lines) + "\n"
