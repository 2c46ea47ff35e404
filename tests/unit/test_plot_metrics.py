"""tools/plot_metrics.py on synthetic metrics.jsonl files of two runs."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("plot_metrics", ROOT / "tools" / "plot_metrics.py")
plot_metrics = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_metrics)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(folder: Path, steps: int, scale: float, eval_every: int = 5, torn: bool = False) -> Path:
    folder.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        row = {
            "step": step,
            "time": 1.7e9 + step,
            "loss/total": scale / step,
            "loss/mle": 0.5 * scale / step,
            "loss/opd": 0.5 * scale / step,
            "reward/accuracy": 1 - math.exp(-step / 10),
            "weight/mle_mean": 1.0,
            "weight/opd_entropy": 0.3,
            "path/mle_share": 0.4,
            "entropy/student": 1.2 - 0.01 * step,
            "entropy/sum": 123.0,  # bookkeeping: never plotted
            "response/length_mean": 40 + step,
            "time/generate": 2.0,
            "time/update": 1.0,
            "perf/tokens_per_s": None,  # a null metric is skipped, not plotted as zero
        }
        if step % eval_every == 0:
            row.update({"eval/accuracy": 0.5, "eval/pass@4": 0.8})
        lines.append(json.dumps(row))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"step": 99, "loss/to'  # a run still writing its last line
    (folder / "metrics.jsonl").write_text(text)
    return folder


def test_two_runs_overlaid(tmp_path: Path) -> None:
    a = _write_run(tmp_path / "scope", 20, 1.0)
    b = _write_run(tmp_path / "opd", 12, 2.0, torn=True)
    written = plot_metrics.plot_runs([a, b], tmp_path / "plots")
    names = sorted(p.stem for p in written)
    # throughput is absent: its only metric is always null.
    assert names == ["accuracy", "entropy", "losses", "response_length", "times", "weights"]
    for path in written:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
    rows = plot_metrics.load_run(b)
    assert len(rows) == 12  # the torn line is dropped
    keys = plot_metrics.group_keys([rows], dict(plot_metrics.GROUPS)["entropy"])
    assert keys == ["entropy/student"]
    assert plot_metrics.group_keys([rows], dict(plot_metrics.GROUPS)["accuracy"]) == [
        "reward/accuracy",
        "eval/accuracy",
        "eval/pass@4",
    ]
    assert plot_metrics.series(rows, "eval/accuracy") == ([5, 10], [0.5, 0.5])


def test_command_line_and_errors(tmp_path: Path) -> None:
    import matplotlib.image

    run = _write_run(tmp_path / "run", 6, 1.0)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plot_metrics.py"), str(run)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert matplotlib.image.imread(run / "plots" / "losses.png").ndim == 3  # default --out: RUN_DIR/plots
    assert str(run / "plots" / "losses.png") in proc.stdout

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(plot_metrics.PlotError, match="line 2"):
        plot_metrics.load_run(bad)
    with pytest.raises(plot_metrics.PlotError, match="2 labels for 1 runs"):
        plot_metrics.plot_runs([run], tmp_path / "x", ["a", "b"])


def test_missing_run_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plot_metrics.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "no metrics.jsonl" in err and "Traceback" not in err
