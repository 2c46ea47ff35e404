"""The evaluation report: averages over benchmarks, the Table-1 Markdown, the Pass@k plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from scope_ds.evaluation import report
from scope_ds.evaluation.estimators import summarize


def _results() -> dict:
    a = summarize([[True, False], [False, False]])  # avg 0.25, pass@2 0.5
    b = summarize([[True, True], [True, False]])  # avg 0.75, pass@2 1.0
    models = [
        {"label": "base", "benchmarks": {"aime24": a, "math500": b}},
        {"label": "scope", "benchmarks": {"aime24": b}},  # a model missing a benchmark shows "-"
    ]
    for m in models:
        m["average"] = report.average(m["benchmarks"])
    return {"settings": {}, "models": models}


def test_average_is_unweighted_over_benchmarks() -> None:
    avg = _results()["models"][0]["average"]
    assert avg["benchmarks"] == 2 and avg["avg"] == pytest.approx(0.5)
    assert avg["pass_at_k"] == {1: pytest.approx(0.5), 2: pytest.approx(0.75)}
    assert set(avg["bootstrap_best_of_k"]) == {1, 2}


def test_markdown_table_has_the_paper_layout() -> None:
    text = report.markdown_table(_results(), ["aime24", "math500"], 2)
    lines = text.splitlines()
    assert lines[0] == "### Avg@2 / Pass@2 (unbiased estimator, Chen et al. 2021), %"
    assert "| Model | aime24 | math500 | Avg |" in lines
    assert "| base | 25.0 / 50.0 | 75.0 / 100.0 | 50.0 / 75.0 |" in lines
    assert "| scope | 75.0 / 100.0 | - | 75.0 / 100.0 |" in lines
    assert any(line.startswith("### Avg@2 / bootstrap best-of-2") for line in lines)
    assert text.count("| Model |") == 2


def test_plot_is_a_png(tmp_path: Path) -> None:
    import matplotlib.image

    for name in ("aime24", "average"):
        path = tmp_path / f"{name}.png"
        report.plot_pass_at_k(_results(), name, path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(path).ndim == 3
