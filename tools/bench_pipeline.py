#!/usr/bin/env python
"""Per-step time of GRPO and SCOPE, synchronous and asynchronous, on the toy task.

    python tools/bench_pipeline.py [--steps 8] [--warmup 2] [--ranks 1] [--out docs/bench_pipeline.md] [key=value ...]

Every run trains the toy pair with the embedded rollout server in its own process, the same
prompts per step and rollouts per prompt; only the algorithm and pipeline.max_staleness change.
Reported per configuration (medians over the steps after the warm-up): seconds per step, the
busy time of each stage, the slowest stage, and step time over slowest stage.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("generate", "verify", "teacher", "update", "sync")
CONFIGS = (
    ("GRPO sync", "grpo", 0),
    ("SCOPE sync", "scope", 0),
    ("SCOPE async k=1", "scope", 1),
    ("SCOPE async k=2", "scope", 2),
)


def run_one(algo: str, k: int, args, out_dir: str) -> list[dict]:
    overrides = [
        f"algo.name={algo}",
        f"pipeline.max_staleness={k}",
        f"train.steps={args.steps}",
        f"logging.out_dir={out_dir}",
        "logging.progress=false",
        "logging.rollouts=false",
        "logging.tensorboard=false",
        "data.eval_every=0",
        *args.overrides,
    ]
    script = os.path.join(ROOT, "scope_ds", "train.py")
    if args.ranks > 1:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), script, *overrides]
    else:
        cmd = [sys.executable, script, *overrides]
    # One core for the trainer, one for the server (its default): the stages overlap, not fight.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.trainer_threads)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{algo} k={k} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarise(rows: list[dict], warmup: int) -> dict[str, float]:
    rows = rows[warmup:] or rows
    med = {s: statistics.median(r.get(f"time/{s}", 0.0) for r in rows) for s in STAGES}
    step = statistics.median(r["time/step"] for r in rows)
    slowest = max(med, key=med.get)
    return {
        "step": step,
        **med,
        "slowest": slowest,
        "slowest_s": med[slowest],
        # teacher, update and sync run one after another on the same ranks: the trainer's chain
        "trainer": statistics.median(sum(r.get(f"time/{s}", 0.0) for s in ("teacher", "update", "sync")) for r in rows),
        "overlap": statistics.median(r["pipeline/overlap"] for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--trainer-threads", type=int, default=1)
    ap.add_argument("--out", help="also write the table (Markdown) here")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, algo, k in CONFIGS:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = summarise(run_one(algo, k, args, os.path.join(tmp, f"{algo}{k}")), args.warmup)
    lines = [
        "| configuration | s / step | generate | verify | teacher | update | sync | slowest stage | "
        "step / slowest | trainer chain | overlap |",
        "|" + "---|" * 11,
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['step']:.2f} | "
            + " | ".join(f"{r[s]:.2f}" for s in STAGES)
            + f" | {r['slowest']} {r['slowest_s']:.2f} | {r['step'] / r['slowest_s']:.2f} | {r['trainer']:.2f}"
            + f" | {r['overlap']:.2f} |"
        )
    grpo = results["GRPO sync"]["step"]
    best = min(("SCOPE async k=1", "SCOPE async k=2"), key=lambda n: results[n]["step"])
    r = results[best]
    verdict = (
        f"{best}: {r['step']:.2f} s/step vs GRPO sync {grpo:.2f} s/step "
        f"({'meets' if r['step'] <= grpo else 'misses'} 'no slower than GRPO'); "
        f"{r['step'] / r['slowest_s']:.2f}x its slowest stage "
        f"({'meets' if r['step'] <= 1.15 * r['slowest_s'] else 'misses'} 'within 15%')"
    )
    table = "\n".join(lines)
    print(table + "\n\n" + verdict)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n\n" + verdict + "\n")


if __name__ == "__main__":
    main()
