#!/usr/bin/env python
"""One SCOPE training step (teacher scoring + update) at the paper's vocabulary: padded micro-batches
with whole logits against packed token budgets with statistics from hidden states.

    python tools/bench_step.py [--ranks 2] [--rollouts 16] [--mean 700] [--max 2048] [--hidden 128]
        [--layers 2] [--steps 2] [--configs "packing=false micro=1 old=all;packing=true tokens=4096"]
        [--out docs/bench_step.md]
    python tools/bench_step.py --sp [--lengths 2048,4096,8192] [--configs "sp=1;sp=2;sp=2 tiled=true"]
        [--out docs/bench_step.md]
    python tools/bench_step.py --placements [--shapes qwen3,llama] [--out docs/bench_step.md]

Builds a Qwen3-shaped random student and teacher (vocabulary 151,936, tied embeddings, small width
and depth so that this runs on a CPU) once, into ~/.cache/scope_ds/bench_step/. Each configuration
runs in its own `deepspeed --num_gpus RANKS` job (ZeRO-3, gloo on CPU): the same global batch of
ragged rollouts (prompts of 20-150 tokens; responses log-normal, mean about --mean, cut at --max;
half of them incorrect, so the teacher scores those), --steps steps of score + update, the last
one timed. Prints a Markdown table (with --out, also into that page's bench:step block): peak
resident memory per rank during the step (the highest rank), seconds per step, trained (response)
tokens per second, the padding share of the positions the forward passes ran over, micro-batches
per rank. ``old=all`` recomputes pi_old for every
rollout (the trainer's behaviour before it took pi_old from the update's own pass where the plan
does not read it): with ``packing=false micro=1`` it is the step as it was before packing.
``name=opd kl=full`` runs another algorithm; ``score=all`` scores every rollout of the teacher's
mask before the update even where the update's full-KL pass gives the teacher's log-probs (as
before that pass did).

``--sp`` (sequence parallelism, docs/cluster.md): each step is one prompt's ``--ranks`` answers of
exactly L tokens each, one correct and the rest incorrect, for each L of ``--lengths``; ``sp=N``
splits every row over N ranks (``parallel.sequence_parallel_size``), ``tiled=true`` adds
``parallel.tiled_mlp``. The table (bench:step_sp block) has each run's figures and, per
configuration, the growth of the step's memory per answer token (the slope over the lengths) and
the seconds per trained token, each against sp=1's.

``--placements`` (the teacher's, docs/cluster.md): the teacher alone scoring every rollout of the
batch, once per ``model.teacher_placement`` (zero3, replicated, tensor over the ranks), on the
Qwen3-shaped pair above and on bench_peer's random Llama pair (10.7M / 27.3M parameters, the toy
tokenizer): seconds per 1,000 scored tokens, and against zero3's (bench:step_placements block).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import benchlib

ROOT = benchlib.ROOT
sys.path.insert(0, str(ROOT))
VOCAB = 151_936
DEFAULT_CONFIGS = "packing=false micro=1 old=all;packing=false micro=1;packing=false micro=2;packing=true tokens=4096"
SP_CONFIGS = "sp=1;sp=2;sp=2 tiled=true"
SP_PROMPT = 20  # prompt tokens of the --sp rows
PLACEMENTS = ("zero3", "replicated", "tensor")


def _models(hidden: int, layers: int, kv: int | None = None) -> tuple[Path, Path]:
    """Student (hidden) and teacher (1.5 x hidden) Qwen3-shaped random models, cached by shape.
    ``kv``: both with that many key-value heads (--sp: 2, which a group of 2 splits; else half the
    heads) and 32k positions."""
    shape = f"v{VOCAB}-h{hidden}-l{layers}" + (f"-kv{kv}" if kv else "")
    root = Path.home() / ".cache" / "scope_ds" / "bench_step" / shape
    out = []
    for name, width, seed in (("student", hidden, 0), ("teacher", hidden * 3 // 2, 1)):
        heads = max(2, width // 32)
        folder = benchlib.build_random_model(
            root / name,
            "qwen3",
            seed,
            cached=True,
            vocab_size=VOCAB,
            hidden_size=width,
            intermediate_size=3 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv or max(1, heads // 2),
            head_dim=32,
            max_position_embeddings=32768 if kv else 4096,
            tie_word_embeddings=True,
        )
        out.append(folder)
    return out[0], out[1]


def _batch(rollouts: int, group: int, mean: int, cap: int, seed: int = 0, vocab: int = VOCAB):
    from scope_ds.records import Batch

    rng = random.Random(seed)
    mu = math.log(mean) - 0.5  # log-normal, sigma 1: mean exp(mu + 1/2) before the cut
    out = []
    for i in range(rollouts):
        if i % group == 0:
            prompt = [rng.randrange(10, vocab) for _ in range(rng.randint(20, 150))]
        length = max(1, min(cap, int(rng.lognormvariate(mu, 1.0))))
        resp = [rng.randrange(10, vocab) for _ in range(length)]
        out.append(_rollout(rng, i, group, prompt, resp, correct=rng.random() < 0.5))
    return Batch(step=0, records=[], rollouts=out)


def _long_batch(answers: int, length: int, seed: int = 0):
    """One prompt's ``answers`` answers of exactly ``length`` tokens, the first correct."""
    from scope_ds.records import Batch

    rng = random.Random(seed)
    prompt = [rng.randrange(10, VOCAB) for _ in range(SP_PROMPT)]
    out = []
    for i in range(answers):
        resp = [rng.randrange(10, VOCAB) for _ in range(length)]
        out.append(_rollout(rng, i, answers, prompt, resp, correct=i == 0))
    return Batch(step=0, records=[], rollouts=out)


def _rollout(rng: random.Random, i: int, group: int, prompt: list[int], resp: list[int], correct: bool):
    """Rollout ``i`` of the batch (prompt i // group), with behaviour log-probs near a uniform
    distribution's."""
    from scope_ds.records import Rollout

    return Rollout(
        prompt_id=str(i // group),
        sample_index=i % group,
        group_id=f"0:{i // group}",
        prompt_ids=prompt,
        response_ids=resp,
        behaviour_logprobs=[rng.uniform(-13.0, -11.0) for _ in resp],  # ~ log(1 / 151936)
        correct=correct,
        reward=float(correct),
    )


def _peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))


def child(args: argparse.Namespace) -> None:
    import torch

    from scope_ds.algorithms import algorithm_of
    from scope_ds.config import load_config
    from scope_ds.engines import ds
    from scope_ds.engines.learner import Learner
    from scope_ds.pipeline.build import build_engines
    from scope_ds.pipeline.collectives import score_group

    opts = dict(kv.split("=") for kv in args.config.split())
    packing = opts.get("packing", "true") == "true"
    if args.length:  # --sp: rows of one answer each, the budget just holds one
        opts.setdefault("tokens", str(SP_PROMPT + args.length))
    sp_keys = [
        f"parallel.sequence_parallel_size={opts.get('sp', 1)}",
        f"parallel.tiled_mlp={opts.get('tiled', 'false')}",
        *(["train.share_prompts=false"] if int(opts.get("sp", 1)) > 1 else []),
    ]
    overrides = [
        f"train.packing={str(packing).lower()}",
        f"train.micro_batch_size={opts.get('micro', 1)}",
        f"train.score_batch_size={opts.get('micro', 1)}",
        f"train.max_tokens_per_micro_batch={opts.get('tokens', 4096)}",
        f"train.logprob_chunk={opts.get('chunk', 0)}",
        f"train.score_max_tokens_per_micro_batch={2 * int(opts.get('tokens', 4096))}",
        f"data.max_prompt_tokens={SP_PROMPT if args.length else 150}",
        f"rollout.max_new_tokens={args.length or args.max}",
        f"rollout.n={args.group}",
        f"train.prompts_per_step={args.rollouts // args.group}",
        "model.dtype=float32",
        *[f"algo.{k}={opts[k]}" for k in ("name", "kl") if k in opts],
        *sp_keys,
        f"model.teacher_placement={opts.get('place', 'auto')}",
    ]
    cfg = load_config(None, overrides)
    rank, world = ds.init_distributed()
    torch.manual_seed(0)
    algo = algorithm_of(cfg.algo)
    if opts.get("old") == "all":  # the baseline: pi_old recomputed for every rollout, as before
        algo.reads_student_logp = lambda correct_B: torch.ones_like(correct_B, dtype=torch.bool)
    if opts.get("score") == "all":  # every rollout the teacher is needed for scored before the update, as before
        algo.reads_teacher_logp = algo.teacher_mask
    if "place" in opts:  # --placements: the teacher scores every rollout, and no update runs
        algo.reads_teacher_logp = lambda correct_B: torch.ones_like(correct_B, dtype=torch.bool)
    student, teacher, reference = build_engines(cfg, algo, world, args.student, args.teacher, score_group())
    learner = Learner(cfg, algo, rank, world, student, teacher, reference)
    result = {}
    for _ in range(args.steps):
        batch = (
            _long_batch(world, args.length)
            if args.length
            else _batch(args.rollouts, args.group, args.mean, args.max, vocab=student.vocab_size)
        )
        torch.distributed.barrier()
        _peak_reset()
        base = _status_kb("VmRSS")
        t0 = time.perf_counter()
        learner.score_teacher(batch.rollouts)
        t1 = time.perf_counter()
        if "place" in opts:
            scored = sum(r.response_length for r in batch.rollouts if r.teacher_logprobs is not None)
            result = {"score_s": t1 - t0, "scored_tokens": scored, "peak_gib": _status_kb("VmHWM") / 2**20}
            continue
        metrics = learner.update(batch.rollouts, batch.times)
        torch.distributed.barrier()
        wall = time.perf_counter() - t0
        result = {
            "seconds": wall,
            "score_s": t1 - t0,
            "old_logprobs_s": batch.times["old_logprobs"],
            "peak_gib": _status_kb("VmHWM") / 2**20,
            "step_extra_gib": (_status_kb("VmHWM") - base) / 2**20,
            "tokens": sum(r.response_length for r in batch.rollouts),
            "padding_share": metrics["perf/padding_share"],
            "micro_batches": metrics["perf/micro_batches"],
            "loss": metrics["loss/total"],
        }
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, result)
    if rank == 0:
        Path(args.out).write_text(json.dumps(parts))
    ds.end_distributed()


def _table(rows: list[tuple[str, list[dict] | None]]) -> str:
    """The Markdown table of each configuration's per-rank results (None: the run failed)."""
    lines = [
        "| configuration | peak RSS per rank (GiB) | of it, the step's (GiB) | s / step (teacher, pi_old, update) "
        "| trained tokens / s | padding share | micro-batches per rank |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for config, parts in rows:
        if parts is None:
            lines.append(f"| {config} | failed | | | | | |")
            continue
        peak = max(p["peak_gib"] for p in parts)
        extra = max(p["step_extra_gib"] for p in parts)
        wall = max(p["seconds"] for p in parts)
        tokens = parts[0]["tokens"]
        score, old = max(p["score_s"] for p in parts), max(p["old_logprobs_s"] for p in parts)
        lines.append(
            f"| {config} | {peak:.2f} | {extra:.2f} | {wall:.1f} ({score:.1f}, {old:.1f}, {wall - score - old:.1f}) "
            f"| {tokens / wall:.0f} | "
            f"{parts[0]['padding_share']:.1%} | {parts[0]['micro_batches']:.0f} |"
        )
    return "\n".join(lines)


def _sp_table(rows: list[tuple[int, str, list[dict] | None]]) -> str:
    """The --sp table: each (length, configuration)'s run, then per configuration the slope of the
    peak memory per rank over the lengths and the seconds per trained token, against sp=1's."""
    lines = [
        "| answer tokens | configuration | peak RSS per rank (GiB) | s / step | trained tokens / s |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    by_config: dict[str, list[tuple[int, float, float]]] = {}
    for length, config, parts in rows:
        if parts is None:
            lines.append(f"| {length} | {config} | failed | | |")
            continue
        peak, wall, tokens = max(p["peak_gib"] for p in parts), max(p["seconds"] for p in parts), parts[0]["tokens"]
        lines.append(f"| {length} | {config} | {peak:.2f} | {wall:.1f} | {tokens / wall:.0f} |")
        by_config.setdefault(config, []).append((length, peak, wall / tokens))
    lines += [
        "",
        "| configuration | memory growth (MiB per 1k answer tokens) | vs sp=1 | ms per trained token | vs sp=1 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    slopes = {c: _slope([(n, gib * 1024) for n, gib, _ in pts]) for c, pts in by_config.items() if len(pts) > 1}
    per_token = {c: sum(t for _, _, t in pts) / len(pts) for c, pts in by_config.items()}
    base = next(iter(by_config), None)
    for config in by_config:
        if config not in slopes:
            continue
        mem = f"{slopes[config] / slopes[base]:.2f}" if slopes.get(base) else "n/a"
        lines.append(
            f"| {config} | {slopes[config] * 1000:.1f} | {mem} | {per_token[config] * 1000:.2f} | "
            f"{per_token[config] / per_token[base]:.2f} |"
        )
    return "\n".join(lines)


def _placements_table(rows: list[tuple[str, str, list[dict] | None]]) -> str:
    """The --placements table: each (shape, placement)'s scoring seconds per 1,000 tokens, and
    against zero3's on the same shape."""
    lines = [
        "| shape | model.teacher_placement | s / 1k scored tokens | vs zero3 | peak RSS per rank (GiB) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    base: dict[str, float] = {}
    for shape, place, parts in rows:
        if parts is None:
            lines.append(f"| {shape} | {place} | failed | | |")
            continue
        per_1k = max(p["score_s"] for p in parts) / parts[0]["scored_tokens"] * 1000
        if place == "zero3":
            base[shape] = per_1k
        ratio = f"{per_1k / base[shape]:.2f}" if shape in base else "n/a"
        peak = max(p["peak_gib"] for p in parts)
        lines.append(f"| {shape} | {place} | {per_1k:.3f} | {ratio} | {peak:.2f} |")
    return "\n".join(lines)


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of y over x."""
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rollouts", type=int, default=16, help="rollouts per step (the global batch)")
    ap.add_argument("--group", type=int, default=4, help="rollouts per prompt")
    ap.add_argument("--mean", type=int, default=700, help="mean response length before the cut")
    ap.add_argument("--max", type=int, default=2048, help="longest response")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="steps per configuration; the last is timed")
    ap.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help="';'-separated: packing=true|false micro=N tokens=N chunk=N old=all (pi_old recomputed for every "
        "rollout) name=ALGO kl=sampled|full score=all (the teacher scores before the update whatever the plan reads)",
    )
    ap.add_argument("--sp", action="store_true", help="sequence parallelism: single long answers (see above)")
    ap.add_argument("--placements", action="store_true", help="the teacher's scoring at each placement (see above)")
    ap.add_argument("--shapes", default="qwen3,llama", help="--placements: model pairs, comma-separated")
    ap.add_argument("--lengths", default="2048,4096,8192", help="--sp: answer lengths, comma-separated")
    ap.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--student", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", help=argparse.SUPPRESS)
    # --out is the docs page; the children get their result file's path in it (with --child)
    ap.add_argument("--out", help="also write the table into this docs page's bench:step block")
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    if args.placements:
        return _placements(args)
    student, teacher = _models(args.hidden, args.layers, kv=2 if args.sp else None)
    configs = [c.strip() for c in args.configs.split(";") if c.strip()]
    shape = (
        f"{args.ranks} ZeRO-3 ranks (CPU, gloo); Qwen3-shaped student hidden {args.hidden} x {args.layers} layers, "
        f"teacher hidden {args.hidden * 3 // 2}, vocabulary {VOCAB}, float32"
    )
    if args.sp:
        if args.configs == DEFAULT_CONFIGS:
            configs = SP_CONFIGS.split(";")
        args.rollouts = args.group = args.ranks
        print(f"{shape}; one prompt's {args.ranks} answers of each length per step", flush=True)
        runs = [(n, c) for n in map(int, args.lengths.split(",")) for c in configs]
        rows = [(n, c, _run(args, c, student, teacher, n)) for n, c in runs]
        table = _sp_table(rows)
        print("\n" + table)
        if args.out:
            block = "step_sp" if args.layers == 2 else f"step_sp_l{args.layers}"  # a block per depth
            benchlib.write_block(args.out, block, table)
        return 0 if all(parts is not None for *_, parts in rows) else 1
    lengths = [r.response_length for r in _batch(args.rollouts, args.group, args.mean, args.max).rollouts]
    print(
        f"{shape}; {args.rollouts} rollouts per step, responses mean {sum(lengths) / len(lengths):.0f} / max "
        f"{max(lengths)} tokens",
        flush=True,
    )
    rows = [(config, _run(args, config, student, teacher)) for config in configs]
    table = _table(rows)
    print("\n" + table)
    if args.out:
        benchlib.write_block(args.out, "step", table)
    return 0 if all(parts is not None for _, parts in rows) else 1


def _placements(args: argparse.Namespace) -> int:
    """--placements: every placement on every shape, one job each, and their table."""
    pairs = {
        # two key-value heads, which a tensor-parallel group of 2 splits (the default pair has 3)
        "qwen3": (
            _models(args.hidden, args.layers, kv=2),
            f"Qwen3-shaped, hidden {args.hidden} / {args.hidden * 3 // 2}",
        ),
        "llama": (tuple(map(Path, benchlib.llama_pair())), "random Llama, 10.7M / 27.3M parameters"),
    }
    rows = []
    for shape in args.shapes.split(","):
        if shape not in pairs:
            raise SystemExit(f"unknown shape {shape!r}: choose from {sorted(pairs)}")
        (student, teacher), name = pairs[shape]
        print(f"{name}: {args.rollouts} rollouts, every one scored by the teacher, {args.ranks} ranks", flush=True)
        for place in PLACEMENTS:
            rows.append((name, place, _run(args, f"place={place}", student, teacher)))
    table = _placements_table(rows)
    print("\n" + table)
    if args.out:
        benchlib.write_block(args.out, "step_placements", table)
    return 0 if all(parts is not None for *_, parts in rows) else 1


def _run(args: argparse.Namespace, config: str, student: Path, teacher: Path, length: int = 0) -> list[dict] | None:
    """One configuration's job: every rank's results (None: it failed, its output's end said)."""
    name = f"{config} at {length} tokens" if length else config
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        child_args = [
            "--child",
            f"--config={config}",
            f"--student={student}",
            f"--teacher={teacher}",
            f"--out={out}",
            f"--length={length}",
            *[f"--{k}={getattr(args, k)}" for k in ("rollouts", "group", "mean", "max", "steps")],
        ]
        threads = str(max(1, (os.cpu_count() or 2) // args.ranks))
        proc = benchlib.run_child(
            __file__,
            child_args,
            args.ranks,
            launcher=True,
            master_port=benchlib.free_port(),
            env={"OMP_NUM_THREADS": threads},
        )
        if proc.returncode or not out.exists():
            tail = (proc.stdout + proc.stderr)[-3000:]
            print(f"{name}: failed ({proc.returncode})\n{tail}", file=sys.stderr)
            return None
        print(f"{name}: done", file=sys.stderr, flush=True)
        return json.loads(out.read_text())


if __name__ == "__main__":
    sys.exit(main())
