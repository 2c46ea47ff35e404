"""What a SCOPE run's rollouts say about its task: can the weights differ, are the methods apart?

    python -m scope_ds.toy.properties RUN_DIR [RUN_DIR ...]

Reads each run's rollouts/step_*.jsonl and metrics.jsonl (a SCOPE run: both paths weighted) and
prints a table: the median over groups of the ratio of the largest to the smallest weight within a
group's correct subset (student weights, Eq. 4) and within its incorrect subset (teacher weights,
Eq. 5), counted over subsets of two or more (and the 90th percentile of the first), the share of
correct subsets whose answers are not all one text; the mean student perplexity on the correct path and
teacher perplexity on the incorrect one; the training accuracy of the first and last 5 steps; the
held-out accuracy at the first and last evaluation; seconds per step. docs/study.md uses it to
choose the harder toy.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def properties(run: Path) -> dict[str, float]:
    ratios: dict[str, list[float]] = {"mle": [], "opd": []}
    distinct = 0  # correct subsets (of two or more) whose answers are not all one text
    ppl: dict[str, list[float]] = {"mle": [], "opd": []}
    for step_file in sorted((run / "rollouts").glob("step_*.jsonl")):
        groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for r in _rows(step_file):
            if r["path"] in ratios and r["weight"] is not None:
                groups[(r["group_id"], r["path"])].append(r)
            length = max(1, r["response_length"])
            if r["path"] == "mle" and r["student_seq_logp"] is not None:
                ppl["mle"].append(math.exp(-r["student_seq_logp"] / length))
            if r["path"] == "opd" and r["teacher_seq_logp"] is not None:
                ppl["opd"].append(math.exp(-r["teacher_seq_logp"] / length))
        for (_, path), rs in groups.items():
            w = [r["weight"] for r in rs]
            if len(w) > 1 and min(w) > 0:
                ratios[path].append(max(w) / min(w))
                distinct += path == "mle" and len({tuple(r["response_ids"]) for r in rs}) > 1
    metrics = _rows(run / "metrics.jsonl")
    train = [m for m in metrics if m["step"] >= 1 and "reward/accuracy" in m]
    evals = [m["eval/accuracy"] for m in metrics if m.get("eval/accuracy") is not None]

    def med(x: list[float]) -> float:
        return statistics.median(x) if x else float("nan")

    def p90(x: list[float]) -> float:
        return statistics.quantiles(x, n=10)[-1] if len(x) > 1 else float("nan")

    def mean(x: list[float]) -> float:
        return statistics.fmean(x) if x else float("nan")

    return {
        "w_ratio_correct": med(ratios["mle"]),
        "w_ratio_correct_p90": p90(ratios["mle"]),
        "distinct_correct": distinct / max(1, len(ratios["mle"])),
        "w_ratio_incorrect": med(ratios["opd"]),
        "subsets_correct": len(ratios["mle"]),
        "ppl_student_correct": mean(ppl["mle"]),
        "ppl_teacher_incorrect": mean(ppl["opd"]),
        "train_acc_first5": mean([m["reward/accuracy"] for m in train[:5]]),
        "train_acc_last5": mean([m["reward/accuracy"] for m in train[-5:]]),
        "eval_first": evals[0] if evals else float("nan"),
        "eval_last": evals[-1] if evals else float("nan"),
        "s_per_step": med([m["time/step"] for m in train]),
    }


COLUMNS = [
    ("distinct_correct", "correct subsets of several texts", ".2f"),
    ("w_ratio_correct", "w max/min correct", ".3f"),
    ("w_ratio_correct_p90", "p90", ".3f"),
    ("w_ratio_incorrect", "w max/min incorrect", ".2f"),
    ("subsets_correct", "correct subsets", "d"),
    ("ppl_student_correct", "PPL_S correct", ".3f"),
    ("ppl_teacher_incorrect", "PPL_T incorrect", ".3f"),
    ("train_acc_first5", "train acc first 5", ".3f"),
    ("train_acc_last5", "train acc last 5", ".3f"),
    ("eval_first", "held-out first", ".3f"),
    ("eval_last", "held-out last", ".3f"),
    ("s_per_step", "s / step", ".2f"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    args = p.parse_args(argv)
    print("| run | " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("| --- |" + " ---: |" * len(COLUMNS))
    for run in args.runs:
        if not (run / "metrics.jsonl").is_file():
            print(f"error: {run} has no metrics.jsonl (not a run folder)", file=sys.stderr)
            return 2
        got = properties(run)
        print(f"| {run.name} | " + " | ".join(format(got[k], f) for k, _, f in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
