#!/usr/bin/env python
"""Per-step time of GRPO and SCOPE, synchronous and asynchronous, on the toy task.

    python tools/bench_pipeline.py [--steps 8] [--warmup 2] [--repeats 2] [--ranks 1]
        [--configs "SCOPE async k=1;SCOPE async k=2"] [--out docs/bench_pipeline.md] [key=value ...]
    python tools/bench_pipeline.py --long [--steps 8] [--out FILE]   # long, ragged responses

Every run trains the toy pair with the embedded rollout server in its own process, the same
prompts per step and rollouts per prompt; only the algorithm, pipeline.max_staleness,
pipeline.overlap_teacher and where pi_old comes from (algo.old_logprobs) change. Each configuration runs --repeats times, interleaved with the
others, so that a slow spell of the machine does not land on one configuration. Reported per
configuration (medians over every step after each run's warm-up): seconds per step, the busy
time of each stage, the slowest stage, step time over slowest stage, and the two targets.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import benchlib

ROOT = str(benchlib.ROOT)
STAGES = ("generate", "verify", "teacher", "update", "sync")
# name -> its overrides (pi_old is recomputed by the trainer unless a row says otherwise)
CONFIGS = {
    "GRPO sync": ["algo.name=grpo"],
    "SCOPE sync": ["algo.name=scope"],
    "SCOPE sync, pi_old from the server": ["algo.name=scope", "algo.old_logprobs=server"],
    "SCOPE async k=1": ["algo.name=scope", "pipeline.max_staleness=1"],
    "SCOPE async k=2": ["algo.name=scope", "pipeline.max_staleness=2"],
    "SCOPE async k=1, teacher beside update": [
        "algo.name=scope",
        "pipeline.max_staleness=1",
        "pipeline.overlap_teacher=true",
    ],
    "SCOPE async k=2, teacher beside update": [
        "algo.name=scope",
        "pipeline.max_staleness=2",
        "pipeline.overlap_teacher=true",
    ],
}


# --long: partial rollouts against abort-and-regenerate on long, ragged responses. The syncs cut
# the samples under way (pipeline.sync_between_batches=false): what is measured is what an
# interruption costs each way.
_CUT = ["algo.name=scope", "pipeline.sync_between_batches=false"]
LONG_CONFIGS = {
    "SCOPE sync": ["algo.name=scope"],
    "SCOPE async k=1, regenerate": [*_CUT, "pipeline.max_staleness=1", "rollout.partial_rollouts=false"],
    "SCOPE async k=1, partial": [*_CUT, "pipeline.max_staleness=1"],
    "SCOPE async k=2, regenerate": [*_CUT, "pipeline.max_staleness=2", "rollout.partial_rollouts=false"],
    "SCOPE async k=2, partial": [*_CUT, "pipeline.max_staleness=2"],
}
LONG_VOCAB, LONG_MAX_NEW = 512, 2048


def long_pair() -> list[str]:
    """Random Llamas (student hidden 64 x 2 layers, teacher 96 x 3) over a 512-token vocabulary
    with the toy tokenizer (its 64 ids; the rest decode to nothing) and a 2304-token context.
    Their logits start near uniform, so EOS (one id of 512) ends a response after a geometric,
    long-tailed number of tokens: about 500 on average, hundreds to a couple of thousand."""
    from scope_ds.toy.models import ensure_toy_models

    toy = ensure_toy_models(None)
    root = os.path.join(os.path.expanduser("~"), ".cache", "scope_ds", "bench_long")
    out = []
    for name, width, layers, seed in (("student", 64, 2, 0), ("teacher", 96, 3, 1)):
        folder = benchlib.build_random_model(
            os.path.join(root, name),
            "llama",
            seed,
            tokenizer_from=toy.student,
            cached=True,
            **benchlib.token_ids(toy.student),
            vocab_size=LONG_VOCAB,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=LONG_MAX_NEW + 256,
            tie_word_embeddings=False,
        )
        out.append(str(folder))
    return out


def long_overrides() -> list[str]:
    student, teacher = long_pair()
    return [
        f"model.student={student}",
        f"model.teacher={teacher}",
        f"rollout.max_new_tokens={LONG_MAX_NEW}",
        "train.prompts_per_step=8",
        "rollout.n=4",
        "train.max_tokens_per_micro_batch=16384",
        "train.score_max_tokens_per_micro_batch=32768",
    ]


def run_one(name: str, args, out_dir: str) -> list[dict]:
    overrides = [
        *(LONG_CONFIGS if args.long else CONFIGS)[name],
        f"train.steps={args.steps}",
        f"logging.out_dir={out_dir}",
        "logging.progress=false",
        "logging.rollouts=false",
        "logging.tensorboard=false",
        "data.eval_every=0",
        *args.overrides,
    ]
    script = os.path.join(ROOT, "scope_ds", "train.py")
    # One core for the trainer, one for the server (its default): the stages overlap, not fight.
    proc = benchlib.run_child(script, overrides, args.ranks, env={"OMP_NUM_THREADS": str(args.trainer_threads)})
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_all(names: list[str], args) -> dict[str, list[dict]]:
    """Each configuration --repeats times, interleaved; its steps after each run's warm-up."""
    rows: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for i, name in enumerate(names):
                print(f"running {name} ({rep + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
                rows[name] += run_one(name, args, os.path.join(tmp, f"c{i}r{rep}"))[args.warmup :]
    return rows


def summarise(rows: list[dict]) -> dict[str, float]:
    med = {s: statistics.median(r.get(f"time/{s}", 0.0) for r in rows) for s in (*STAGES, "old_logprobs")}
    step = statistics.median(r["time/step"] for r in rows)
    slowest = max(STAGES, key=med.get)
    return {
        "step": step,
        **med,
        "slowest": slowest,
        "slowest_s": med[slowest],
        # teacher, update and sync run on the same ranks: the trainer's share of a step
        "trainer": statistics.median(sum(r.get(f"time/{s}", 0.0) for s in ("teacher", "update", "sync")) for r in rows),
        "overlap": statistics.median(r["pipeline/overlap"] for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the medians")
    ap.add_argument("--repeats", type=int, default=2, help="runs per configuration, interleaved (machine noise)")
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--trainer-threads", type=int, default=1)
    ap.add_argument(
        "--configs", help="comma-separated configuration names (default: all; GRPO sync and SCOPE sync always)"
    )
    ap.add_argument(
        "--out", help="also write the table into this docs page's bench:pipeline block (--long: pipeline-long)"
    )
    ap.add_argument("--long", action="store_true", help="partial rollouts vs regenerate on long, ragged responses")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    if args.long:
        args.overrides = [*long_overrides(), *args.overrides]
        return long_main(args)
    names = list(CONFIGS)
    if args.configs:
        wanted = {n.strip() for n in args.configs.split(";")} | {"GRPO sync", "SCOPE sync"}
        unknown = wanted - set(CONFIGS)
        if unknown:
            sys.exit(f"unknown configuration(s) {sorted(unknown)}; known: {names}")
        names = [n for n in names if n in wanted]
    rows = run_all(names, args)
    results = {name: summarise(r) for name, r in rows.items()}
    grpo = results["GRPO sync"]["step"]
    lines = [
        "| configuration | s / step | generate | verify | teacher | update | sync | of which pi_old | slowest stage | "
        "step / slowest | trainer | overlap | <= GRPO sync | <= 1.15 x slowest |",
        "|" + "---|" * 15,
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['step']:.2f} | "
            + " | ".join(f"{r[s]:.2f}" for s in STAGES)
            + f" | {r['old_logprobs']:.2f}"
            + f" | {r['slowest']} {r['slowest_s']:.2f} | {r['step'] / r['slowest_s']:.2f} | {r['trainer']:.2f}"
            + f" | {r['overlap']:.2f} | {'yes' if r['step'] <= grpo else 'no'}"
            + f" | {'yes' if r['step'] <= 1.15 * r['slowest_s'] else 'no'} |"
        )
    # No schedule beats the machine: a step's stage work spread over every core.
    sync = results["SCOPE sync"]
    work = sum(sync[s] for s in STAGES)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    floor = work / cores
    note = (
        f"One SCOPE step's stages add up to {work:.2f} core-seconds (SCOPE sync row); on {cores} cores no "
        f"schedule takes under {floor:.2f} s/step, {floor / sync['slowest_s']:.2f}x its slowest stage "
        f"({sync['slowest']} {sync['slowest_s']:.2f})."
    )
    table = "\n".join(lines)
    print(table + "\n\n" + note)
    if args.out:
        benchlib.write_block(args.out, "pipeline", table + "\n\n" + note)


def long_main(args) -> None:
    """--long: seconds per step, generated tokens per trained token (1.0: nothing thrown away) and
    the share of steps whose generation a weight sync interrupted, per configuration."""
    names = list(LONG_CONFIGS)
    rows = run_all(names, args)
    sync = statistics.median(r["time/step"] for r in rows["SCOPE sync"])
    lines = [
        "| configuration | s / step | / sync | generated / trained tokens | steps a sync interrupted | "
        "mean response tokens | cut at the cap |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rs in rows.items():
        step = statistics.median(r["time/step"] for r in rs)
        generated = sum(r["rollout/generated_tokens"] for r in rs)
        trained = sum(r["response/tokens"] for r in rs)
        hit = sum(1 for r in rs if r["rollout/partial_share"] > 0 or r["rollout/regenerated_tokens"] > 0) / len(rs)
        length = statistics.mean(r["response/length_mean"] for r in rs)
        cut = statistics.mean(r["response/truncated_share"] for r in rs)
        lines.append(
            f"| {name} | {step:.2f} | {step / sync:.2f} | {generated / trained:.3f} | {100 * hit:.0f}% | {length:.0f} | {100 * cut:.1f}% |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        benchlib.write_block(args.out, "pipeline-long", table)


if __name__ == "__main__":
    main()
