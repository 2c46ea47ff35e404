"""Evaluation outputs: results.json, a Markdown table shaped like the paper's Table 1, Pass@k plots.

``results`` (what results.json holds) is::

    {"settings": {...}, "models": [{"label", "source", "benchmarks": {NAME: SUMMARY}, "average": AVG}]}

where SUMMARY is :func:`scope_ds.evaluation.estimators.summarize`'s dict plus response-length
figures and ``skipped_long_prompts`` (prompts over --max-prompt-tokens, not in the figures), and AVG
the unweighted mean over the model's benchmarks (as Table 1 averages its six).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def average(benchmarks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Unweighted mean over benchmarks of avg, pass@k and bootstrap best-of-k (k common to all)."""
    summaries = list(benchmarks.values())
    out: dict[str, Any] = {"benchmarks": len(summaries), "avg": _mean([s["avg"] for s in summaries])}
    for key in ("pass_at_k", "bootstrap_best_of_k"):
        ks = set.intersection(*(set(s[key]) for s in summaries))
        out[key] = {k: _mean([s[key][k] for s in summaries]) for k in sorted(ks)}
    return out


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2) + "\n")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _cell(summary: dict[str, Any] | None, key: str, n: int) -> str:
    if summary is None:
        return "-"
    return f"{_pct(summary['avg'])} / {_pct(summary[key].get(n))}"


def markdown_table(results: dict[str, Any], benchmarks: Sequence[str], n: int) -> str:
    """Two tables, rows = models, columns = benchmarks + Avg, cells "Avg@n / Pass@n" in percent:
    first with the unbiased Pass@n, then with the authors' bootstrap best-of-n (named apart); then
    a line naming the prompts skipped as too long, if any were."""
    header = "| Model | " + " | ".join(benchmarks) + " | Avg |"
    rule = "| --- |" + " ---: |" * (len(benchmarks) + 1)
    parts = []
    for key, title in (
        ("pass_at_k", f"Avg@{n} / Pass@{n} (unbiased estimator, Chen et al. 2021), %"),
        ("bootstrap_best_of_k", f"Avg@{n} / bootstrap best-of-{n} (with replacement, the authors' script), %"),
    ):
        rows = [f"### {title}", "", header, rule]
        for model in results["models"]:
            cells = [_cell(model["benchmarks"].get(b), key, n) for b in benchmarks]
            rows.append(f"| {model['label']} | " + " | ".join(cells) + f" | {_cell(model['average'], key, n)} |")
        parts.append("\n".join(rows))
    skipped = [
        f"{model['label']} / {name}: {s['skipped_long_prompts']} of {s['prompts'] + s['skipped_long_prompts']}"
        for model in results["models"]
        for name, s in model["benchmarks"].items()
        if s.get("skipped_long_prompts")
    ]
    if skipped:
        limit = results.get("settings", {}).get("max_prompt_tokens")
        parts.append(f"Prompts skipped as longer than {limit} tokens (not scored): " + "; ".join(skipped) + ".")
    return "\n\n".join(parts) + "\n"


def plot_pass_at_k(results: dict[str, Any], benchmark: str, path: Path) -> None:
    """Pass@k against k (log2 axis) for every model on one benchmark ("average" for the Avg column):
    unbiased as solid lines, the bootstrap dashed in the same colour."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    all_ks: set[int] = set()
    try:
        for i, model in enumerate(results["models"]):
            summary = model["average"] if benchmark == "average" else model["benchmarks"].get(benchmark)
            if summary is None:
                continue
            colour = f"C{i % 10}"
            for key, style, name in (("pass_at_k", "o-", "unbiased"), ("bootstrap_best_of_k", "x--", "bootstrap")):
                ks = sorted(int(k) for k in summary[key])
                all_ks.update(ks)
                values = [100 * summary[key][k] for k in ks]
                ax.plot(ks, values, style, color=colour, label=f"{model['label']} ({name})")
        log2_k_axis(ax, all_ks)
        save_figure(fig, ax, path, "k", "Pass@k (%)", f"{benchmark}: Pass@k")
    finally:
        plt.close(fig)


def log2_k_axis(ax: Any, ks: set[int]) -> None:
    """A log2 x axis ticked at the k values themselves."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
    ax.minorticks_off()


def save_figure(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Label, grid and legend the axes and write the figure to ``path``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
