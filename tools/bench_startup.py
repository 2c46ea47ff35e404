#!/usr/bin/env python
"""Where a short training run's time goes: process start-up against the steps themselves.

    python tools/bench_startup.py [--steps 6] [--repeats 1] [--out FILE] [key=value ...]

Trains the toy pair (built on first use, as ``scope_ds/train.py`` with no arguments does) for a few
steps of 2 prompts x 4 rollouts, as one plain process and under DeepSpeed's launcher with 1 and 2
ranks. Reported per way of starting (medians over --repeats): the wall time of the whole command,
the sum of its steps' ``time/step``, and the rest, which is start-up (imports, engines, the rollout
server) and shutdown (export, stopping the server). What the test suite's training runs cost is
mostly that rest, so that is the figure to bring down for a faster suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchlib

TRAIN = benchlib.ROOT / "scope_ds" / "train.py"
# name -> (ranks, through DeepSpeed's launcher)
WAYS = {"python train.py": (1, False), "deepspeed, 1 rank": (1, True), "deepspeed, 2 ranks": (2, True)}
SMALL = [
    "train.prompts_per_step=2",
    "rollout.n=4",
    "rollout.max_new_tokens=12",
    "train.micro_batch_size=2",
    "data.eval_every=0",
    "logging.progress=false",
    "checkpoint.export_hf=true",
]


def one_run(ranks: int, launcher: bool, steps: int, extra: list[str]) -> tuple[float, float]:
    """(wall seconds of the command, seconds summed over its steps' time/step)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [*SMALL, f"train.steps={steps}", f"logging.out_dir={tmp}/run", *extra]
        t0 = time.perf_counter()
        proc = benchlib.run_child(TRAIN, args, ranks, launcher=launcher, master_port=benchlib.free_port())
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"training failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        lines = Path(tmp, "run", "metrics.jsonl").read_text().splitlines()
        stepped = sum(m.get("time/step", 0.0) for m in map(json.loads, lines) if m.get("step", 0) > 0)
    return wall, stepped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", help="write the table into this Markdown file's bench:startup block")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    a = p.parse_args()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in WAYS}
    for _ in range(a.repeats):  # interleaved, so that a slow spell of the machine is shared
        for name, (ranks, launcher) in WAYS.items():
            results[name].append(one_run(ranks, launcher, a.steps, a.overrides))
    rows = ["| started as | wall s | steps s | start-up and shutdown s |", "|---|---|---|---|"]
    for name, runs in results.items():
        wall, stepped = statistics.median(w for w, _ in runs), statistics.median(s for _, s in runs)
        rows.append(f"| {name} | {wall:.1f} | {stepped:.1f} | {wall - stepped:.1f} |")
    table = "\n".join(rows)
    print(table)
    if a.out:
        benchlib.write_block(a.out, "startup", table)


if __name__ == "__main__":
    main()
