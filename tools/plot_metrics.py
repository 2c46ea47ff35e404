"""Training curves from one or more runs' metrics.jsonl, several runs overlaid, as PNGs.

    python tools/plot_metrics.py RUN_DIR [RUN_DIR ...] [--out DIR] [--labels A,B,...]

One PNG per group, one panel per metric, one line per run (the run folder's name, or --labels):
accuracy (training reward and held-out eval figures), losses (total and per path), weights (per
path mean, entropy and share), entropy, response length, stage times, throughput. A group whose
metrics no run logged is skipped. --out defaults to RUN_DIR/plots for one run, ./plots for several.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from scope_ds.metrics import read_metrics  # noqa: E402

# (file stem, regexes of metric keys, in panel order). Sums and token counts are bookkeeping, not curves.
GROUPS: list[tuple[str, list[str]]] = [
    ("accuracy", [r"reward/accuracy", r"reward/mean", r"eval/(.+/)?accuracy", r"eval/(.+/)?(avg|pass)@\d+"]),
    ("losses", [r"loss/total", r"loss/.+"]),
    ("weights", [r"weight/.+", r"path/.+_share"]),
    ("entropy", [r"entropy/(?!sum$|tokens$).+"]),
    ("response_length", [r"response/length.*", r"eval/(.+/)?response_length_mean", r"eval/(.+/)?truncated_share"]),
    ("times", [r"time/.+"]),
    ("throughput", [r"perf/.+", r"pipeline/.+", r"is/truncated_share", r"policy/version"]),
]


class PlotError(RuntimeError):
    """A run folder without readable metrics; main prints it without a traceback."""


def load_run(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics rows of a run. A torn last line (a run still writing) is dropped; any other bad line is an error."""
    if not (run_dir / "metrics.jsonl").is_file():
        raise PlotError(f"{str(run_dir)!r} has no metrics.jsonl (not a run folder?)")
    try:
        return read_metrics(str(run_dir))
    except json.JSONDecodeError:
        pass  # find the bad line below
    lines = (run_dir / "metrics.jsonl").read_text().rstrip("\n").split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break  # torn last line
            raise PlotError(f"{run_dir}/metrics.jsonl line {number}: not valid JSON ({exc})") from exc
    return rows


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric, skipping rows without it or with a null / non-finite value."""
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and "step" in row:
            xs.append(row["step"])
            ys.append(float(value))
    return xs, ys


def group_keys(runs: Sequence[list[dict[str, Any]]], patterns: Sequence[str]) -> list[str]:
    """Keys logged by any run that match a pattern (first matching pattern first, then by name)."""
    present = {k for rows in runs for row in rows for k, v in row.items() if isinstance(v, (int, float))}
    keys: list[str] = []
    for pattern in patterns:
        keys += sorted(k for k in present if re.fullmatch(pattern, k) and k not in keys)
    return keys


def plot_group(
    name: str, keys: Sequence[str], runs: Sequence[list[dict[str, Any]]], labels: Sequence[str], out: Path
) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    try:
        for ax, key in zip(axes.flat, keys, strict=False):
            for i, (data, label) in enumerate(zip(runs, labels, strict=True)):
                xs, ys = series(data, key)
                if xs:  # sparse series (evaluations every N steps) get markers so single points show
                    ax.plot(xs, ys, "o-" if len(xs) < 50 else "-", ms=3, color=f"C{i % 10}", label=label)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(True, alpha=0.3)
        for ax in list(axes.flat)[len(keys) :]:
            ax.set_visible(False)
        handles, names = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="upper right", fontsize=8)
        fig.suptitle(name.replace("_", " "))
        fig.tight_layout(rect=(0, 0, 0.9, 0.95))
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def plot_runs(run_dirs: Sequence[Path], out: Path, labels: Sequence[str] | None = None) -> list[Path]:
    """Write every group's PNG that has data; returns the paths written."""
    runs = [load_run(d) for d in run_dirs]
    labels = list(labels) if labels else [d.resolve().name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise PlotError(f"{len(labels)} labels for {len(run_dirs)} runs")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, patterns in GROUPS:
        keys = group_keys(runs, patterns)
        if keys:
            written.append(plot_group(name, keys, runs, labels, out))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/plots, or ./plots for several runs)")
    p.add_argument("--labels", help="comma-separated legend names, one per run (default: the folder names)")
    args = p.parse_args(argv)
    out = args.out or (args.runs[0] / "plots" if len(args.runs) == 1 else Path("plots"))
    try:
        written = plot_runs(args.runs, out, args.labels.split(",") if args.labels else None)
    except PlotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not written:
        print("error: no known metric in the runs' metrics.jsonl", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
