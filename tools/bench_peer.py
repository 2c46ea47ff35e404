#!/usr/bin/env python
"""scope_ds against TRL's DistillationTrainer on the same small-run work, one after the other.

    pip install -e ".[bench]"   # trl, an extra of this benchmark only, not of the package
    python tools/bench_peer.py [--shapes toy,llama] [--steps 12] [--warmup 3] [--out docs/bench_peer.md]
        [--configs "opd 2 ranks;opd 1 rank k=1;scope n=4 1 rank k=1" | --configs zero] [--rounds 1]

Two shapes: the toy pair (0.18M / 0.86M parameters, built by tools/make_toy_models.py) and random
Llama-architecture models of 10.7M / 27.3M parameters with the toy tokenizer (built here once,
into ~/.cache/scope_ds/bench_peer/). The work is the same for both systems: 16 toy prompts per
step, one completion each (four for the SCOPE rows), completions capped at 64 tokens, sampled at
temperature 1, full-vocabulary reverse KL from the teacher (``algo.name=opd algo.kl=full``; TRL's
``beta=1``), learning rate 5e-5. Reported: trained completion tokens per second, the median over
the steps after --warmup, and its ratio to TRL's on the same shape. With ``--rounds R`` TRL and the
rows run R times, interleaved (TRL, the rows, TRL, the rows, ...): each row's ratio is taken to the
TRL run of its own round, and the table gives the medians over rounds with the ratios' range, so
that a slow minute of a noisy machine moves one round, not the verdict. TRL runs in one process; each
scope_ds row is a ``train.py`` run (its ranks and the embedded rollout server on this machine).
Row names: ``k=1`` is ``pipeline.max_staleness=1`` (``k=0``, ``k=2`` likewise), ``zero0``
``train.zero_stage=0``, ``t0`` ``model.teacher_placement=replicated`` (what ``auto`` picks here), ``tz3``
``model.teacher_placement=zero3`` (the teacher partitioned, as before the placements), ``overlap`` ``pipeline.overlap_teacher=true`` (the teacher scores
the next batch beside the update), a trailing ``1t`` (``2t``) the trainer at ``OMP_NUM_THREADS=1`` (``=2``), a
trailing ``active`` the trainer and server at ``OMP_WAIT_POLICY=ACTIVE`` (spinning idle threads;
scope_ds's default is PASSIVE), a trailing ``unshared`` ``train.share_prompts=false`` (each rollout
packed with its own copy of its prompt). Endings combine: ``... overlap unshared 1t``.
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

ROOT = benchlib.ROOT
sys.path.insert(0, str(ROOT))
PROMPTS, MAX_NEW, LR = 16, 64, 5e-5
OPD = ["algo.name=opd", "algo.kl=full", "rollout.n=1"]
SCOPE = ["algo.name=scope", "rollout.n=4"]
SCOPE_K1 = [*SCOPE, "pipeline.max_staleness=1"]
# name -> (ranks, overrides)
CONFIGS = {
    "opd 2 ranks": (2, OPD),
    "opd 1 rank": (1, OPD),
    "opd 1 rank zero0": (1, [*OPD, "train.zero_stage=0"]),
    "opd 1 rank k=1": (1, [*OPD, "pipeline.max_staleness=1"]),
    "opd 1 rank k=1 zero0": (1, [*OPD, "pipeline.max_staleness=1", "train.zero_stage=0"]),
    "scope n=4 1 rank k=1": (1, SCOPE_K1),
    "scope n=4 2 ranks": (2, SCOPE),
    "scope n=4 1 rank": (1, SCOPE),
    # ZeRO-3 knobs (ds_configs/README.md): ds_configs/zero3.json with these zero_optimization keys
    "opd 2 ranks persist 1e6": (2, OPD, {"stage3_param_persistence_threshold": 1e6}),
    "opd 2 ranks persist 1e8": (2, OPD, {"stage3_param_persistence_threshold": 1e8}),
    "opd 2 ranks prefetch 5e6": (2, OPD, {"stage3_prefetch_bucket_size": 5e6}),
    "opd 2 ranks prefetch 0": (2, OPD, {"stage3_prefetch_bucket_size": 0}),
    "opd 2 ranks buckets 5e6": (2, OPD, {"reduce_bucket_size": 5e6, "stage3_prefetch_bucket_size": 5e6}),
    "opd 2 ranks zero0": (2, [*OPD, "train.zero_stage=0"]),
}
# any row's name with one of these endings: that row, run in that environment and with those
# overrides (" 1t" / " 2t": the trainer at one / two intra-op threads, the server keeping its own default;
# " active": spinning idle OpenMP threads; " unshared": each rollout packed with its own copy of
# its prompt, as before train.share_prompts)
ENDINGS = {
    " 1t": ({"OMP_NUM_THREADS": "1"}, []),
    " 2t": ({"OMP_NUM_THREADS": "2"}, []),
    " active": ({"OMP_WAIT_POLICY": "ACTIVE"}, []),
    " unshared": ({}, ["train.share_prompts=false"]),
    " tz3": ({}, ["model.teacher_placement=zero3"]),
    " tensor": ({}, ["model.teacher_placement=tensor"]),
}
# whole student and teacher on the rank (no ZeRO-3 gathers)
WHOLE = ["pipeline.max_staleness=1", "train.zero_stage=0", "model.teacher_placement=replicated"]
for _name, _overrides in {"opd 1 rank k=1": OPD, "scope n=4 1 rank k=1": SCOPE}.items():
    CONFIGS[f"{_name} zero0 t0"] = (1, [*_overrides, *WHOLE])
for _k in (0, 2):  # the same whole-weights OPD row, synchronous and with two batches under way
    CONFIGS[f"opd 1 rank k={_k} zero0 t0"] = (1, [*OPD, f"pipeline.max_staleness={_k}", *WHOLE[1:]])
CONFIGS["scope n=4 1 rank k=1 overlap"] = (1, [*SCOPE_K1, "pipeline.overlap_teacher=true"])
CONFIGS["scope n=4 1 rank k=1 zero0 t0 overlap"] = (1, [*SCOPE_K1, *WHOLE, "pipeline.overlap_teacher=true"])
ZERO_SWEEP = ";".join(["opd 2 ranks", *(n for n in CONFIGS if n.startswith("opd 2 ranks "))])
DEFAULT_CONFIGS = ";".join(
    ["opd 2 ranks", "opd 1 rank k=1", "opd 1 rank k=1 zero0 t0", "opd 1 rank k=1 zero0 t0 1t"]
    + ["scope n=4 1 rank k=1", "scope n=4 1 rank k=1 overlap", "scope n=4 1 rank k=1 zero0 t0 overlap"]
)


def _pair(shape: str) -> tuple[str, str]:
    if shape == "toy":
        from scope_ds.toy.models import ensure_toy_models

        toy = ensure_toy_models(None)
        return str(toy.student), str(toy.teacher)
    if shape == "llama":
        return benchlib.llama_pair()
    raise SystemExit(f"unknown shape {shape!r} (toy, llama)")


def trl_child(student: str, teacher: str, steps: int, out: str) -> None:
    """TRL's DistillationTrainer on the toy prompts: one step's completions and seconds per step."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from scope_ds.toy.task import toy_records

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(student)
    tok.padding_side = "left"
    data = Dataset.from_list([{"prompt": r.prompt} for r in toy_records("train", PROMPTS * steps, 0)])
    seconds, tokens, generating = [], [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            seconds.append(time.perf_counter() - self.t0)

    args = DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_"),
        per_device_train_batch_size=PROMPTS,
        gradient_accumulation_steps=1,
        max_steps=steps,
        max_completion_length=MAX_NEW,
        temperature=1.0,
        beta=1.0,  # reverse KL over the whole vocabulary
        learning_rate=LR,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tok, callbacks=[Clock()]
    )
    generate = trainer._generate_and_score_completions

    def counted(inputs):
        t0 = time.perf_counter()
        batch = generate(inputs)
        generating.append(time.perf_counter() - t0)
        tokens.append(int(batch["completion_mask"].sum()))
        return batch

    trainer._generate_and_score_completions = counted
    trainer.train()
    Path(out).write_text(json.dumps({"seconds": seconds, "tokens": tokens, "generating": generating}))


def run_trl(student: str, teacher: str, args) -> list[float]:
    """TRL's tokens/s per step after the warm-up; prints its seconds a step and those in generation."""
    out = Path(tempfile.mkdtemp(prefix="bench_peer_")) / "trl.json"
    proc = benchlib.run_child(__file__, ["--trl-child", student, teacher, str(args.steps), str(out)])
    if proc.returncode != 0:
        sys.exit(f"TRL failed (is trl installed? pip install trl):\n{proc.stderr[-3000:]}")
    got = json.loads(out.read_text())
    step, gen = (statistics.median(got[k][args.warmup :]) for k in ("seconds", "generating"))
    print(f"(TRL: {step:.3f} s a step, {gen:.3f} s of it in generation and scoring; medians)", file=sys.stderr)
    return [t / s for t, s in zip(got["tokens"], got["seconds"], strict=True)][args.warmup :]


def config_of(name: str) -> tuple[tuple, dict[str, str]]:
    """A row's CONFIGS entry and the environment it adds. A name with endings as in ENDINGS (any
    of them, in any order) is the row without them, in their environment and with
    their overrides added."""
    base, env, extra = name, {}, []
    while base not in CONFIGS:
        end = next((e for e in ENDINGS if base.endswith(e)), None)
        if end is None:
            endings = ", ".join(repr(e) for e in ENDINGS)
            raise SystemExit(f"unknown configuration {name!r}; known: {sorted(CONFIGS)}, each also with {endings}")
        base = base[: -len(end)]
        env.update(ENDINGS[end][0])
        extra += ENDINGS[end][1]
    ranks, overrides, *patch = CONFIGS[base]
    return (ranks, [*overrides, *extra], *patch), env


def run_ours(name: str, student: str, teacher: str, args) -> list[float]:
    """The row's tokens/s per step after the warm-up; prints its stages' seconds a step."""
    (ranks, overrides, *patch), extra_env = config_of(name)
    out_dir = tempfile.mkdtemp(prefix="bench_peer_")
    if patch:  # the student's DeepSpeed JSON with some zero_optimization keys changed
        ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
        ds["zero_optimization"].update(patch[0])
        Path(out_dir, "zero3.json").write_text(json.dumps(ds))
        overrides = [*overrides, f"train.ds_config={out_dir}/zero3.json"]
    overrides = [
        "--config",
        str(ROOT / "recipes" / "toy.yaml"),
        f"model.student={student}",
        f"model.teacher={teacher}",
        f"train.prompts_per_step={PROMPTS}",
        f"rollout.max_new_tokens={MAX_NEW}",
        f"train.lr={LR}",
        *overrides,
        f"train.steps={args.steps}",
        f"logging.out_dir={out_dir}",
        "logging.progress=false",
        "data.eval_every=0",
    ]
    proc = benchlib.run_child(ROOT / "scope_ds" / "train.py", overrides, ranks, env=extra_env)
    if proc.returncode != 0:
        sys.exit(f"scope_ds {name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in Path(out_dir, "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "time/step" in r][args.warmup :]
    stages = ("generate", "teacher", "update", "wait_generated", "sync", "step")
    medians = {k: statistics.median(r[f"time/{k}"] for r in rows) for k in stages if f"time/{k}" in rows[0]}
    if "perf/shared_prompt_share" in rows[0]:  # not a time: the tokens a shared prompt spared
        medians["shared"] = statistics.median(r["perf/shared_prompt_share"] for r in rows)
    print(f"({name}: " + ", ".join(f"{k} {v:.3f}" for k, v in medians.items()) + " s; medians)", file=sys.stderr)
    return [r["response/tokens"] / r["time/step"] for r in rows]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="toy,llama")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help='";"-separated names, or "zero": the ZeRO-3 knob sweep')
    p.add_argument("--rounds", type=int, default=1, help="TRL and the rows this many times, interleaved")
    p.add_argument("--out", default=None, help="also write the table into this docs page's bench:peer block")
    p.add_argument("--trl-child", nargs=4, metavar=("STUDENT", "TEACHER", "STEPS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_child:
        student, teacher, steps, out = args.trl_child
        trl_child(student, teacher, int(steps), out)
        return 0
    configs = ZERO_SWEEP if args.configs == "zero" else args.configs
    names = [c.strip() for c in configs.split(";") if c.strip()]
    for name in names:
        config_of(name)  # an unknown name stops the call before anything runs
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    lines = [
        "| shape | system | trained tokens / s (median) | / TRL | / TRL, range over rounds |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    print(lines[0] + "\n" + lines[1], flush=True)

    def row(shape: str, system: str, values: list[float], trls: list[float]) -> None:
        ratios = [v / t for v, t in zip(values, trls, strict=True)]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else ""
        value, ratio = statistics.median(values), statistics.median(ratios)
        lines.append(f"| {shape} | {system} | {value:.1f} | {ratio:.2f} | {spread} |")
        print(lines[-1], flush=True)

    for shape in args.shapes.split(","):
        student, teacher = _pair(shape)
        t0 = time.time()
        trls: list[float] = []
        ours: dict[str, list[float]] = {name: [] for name in names}
        for turn in range(args.rounds):
            if args.rounds > 1:
                print(f"({shape}: round {turn + 1} of {args.rounds})", file=sys.stderr, flush=True)
            trls.append(statistics.median(run_trl(student, teacher, args)))
            for name in names:
                ours[name].append(statistics.median(run_ours(name, student, teacher, args)))
        row(shape, "TRL DistillationTrainer, 1 process", trls, trls)
        for name in names:
            row(shape, f"scope_ds {name}", ours[name], trls)
        print(f"({shape}: {time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    if args.out:
        benchlib.write_block(args.out, "peer", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
