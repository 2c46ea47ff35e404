"""One SCOPE step on a fixed synthetic batch, under any launcher; rank 0 saves the updated weights.

    deepspeed --num_gpus N tests/integration/zero3_step.py STUDENT TEACHER OUT.pt [incorrect=K]
        [concurrent=0|1] [key=value ...]
    deepspeed --num_gpus N tests/integration/zero3_step.py --cases CASES.json

``--cases``: a JSON list of such argument lists, run one after another in the same ranks (fresh
engines, torch seeded alike, for each), so that many cases pay for one start-up (the session
fixture ``zero3_steps`` in conftest.py).

The batch's behaviour log-probs are the student's own (float64) plus noise of up to 0.3 nats, as
a rollout server's would be after a little drift, so that importance ratios stay near 1.

Used by test_train.py to check that 1 and 2 ranks give the same step (ZeRO-3 numerics). It also
scores a second batch after the step: with concurrent=1 in a thread while the step runs (on the
teacher's own process group, as the pipeline does), with concurrent=0 after it.
"""

import gc
import json
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from train_helpers import token_logprobs_float64  # noqa: E402

from scope_ds.algorithms import algorithm_of  # noqa: E402
from scope_ds.config import load_config  # noqa: E402
from scope_ds.engines import ds  # noqa: E402
from scope_ds.engines.learner import Learner  # noqa: E402
from scope_ds.pipeline.build import build_engines  # noqa: E402
from scope_ds.pipeline.collectives import score_group  # noqa: E402
from scope_ds.records import Batch, Rollout  # noqa: E402


def synthetic_batch(
    student: str, prompts: int, n: int, vocab: int, seed: int = 0, incorrect: int | None = None
) -> Batch:
    """Ragged prompts and responses, half of them 'correct' (or all but ``incorrect`` of them),
    identical on every rank."""
    rng = random.Random(seed)
    rollouts = []
    for p in range(prompts):
        prompt = [1] + [rng.randrange(4, vocab) for _ in range(rng.randint(3, 9))]
        for g in range(n):
            resp = [rng.randrange(4, vocab) for _ in range(rng.randint(0 if g == 3 else 1, 10))]
            rollouts.append(
                Rollout(
                    prompt_id=str(p),
                    sample_index=g,
                    group_id=f"0:{p}",
                    prompt_ids=prompt,
                    response_ids=resp,
                    correct=rng.random() < 0.5,
                )
            )
    for i, r in enumerate(rollouts):
        if incorrect is not None:
            r.correct = i >= incorrect
        r.reward = float(r.correct)
    rows = [{"prompt_ids": r.prompt_ids, "response_ids": r.response_ids} for r in rollouts]
    for r, logp in zip(rollouts, token_logprobs_float64(student, rows), strict=True):
        r.behaviour_logprobs = [x + rng.uniform(-0.3, 0.3) for x in logp]
    return Batch(step=0, records=[], rollouts=rollouts)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local")]
    cases = json.loads(Path(args[1]).read_text()) if args[0] == "--cases" else [args]
    rank, world = ds.init_distributed()
    for case in cases:
        print(f"zero3_step case: {' '.join(map(str, case))}", flush=True)
        run_case(rank, world, [str(a) for a in case])
        gc.collect()
        torch.distributed.barrier()
    ds.end_distributed()


def run_case(rank: int, world: int, args: list[str]) -> None:
    student_path, teacher_path, out = args[:3]
    opts = {a.split("=")[0]: int(a.split("=")[1]) for a in args[3:] if a.split("=")[0] in ("incorrect", "concurrent")}
    overrides = [a for a in args[3:] if a.split("=")[0] not in opts]
    cfg = load_config(
        None, ["train.prompts_per_step=4", "rollout.n=4", "train.micro_batch_size=3", "train.lr=1e-3", *overrides]
    )
    torch.manual_seed(0)
    algo = algorithm_of(cfg.algo)
    student, teacher, reference = build_engines(cfg, algo, world, student_path, teacher_path, score_group())
    learner = Learner(cfg, algo, rank, world, student, teacher, reference)  # a step's parts: no data or servers
    size = (cfg.train.prompts_per_step, cfg.rollout.n, student.vocab_size)
    batch = synthetic_batch(student_path, *size, incorrect=opts.get("incorrect"))
    after = synthetic_batch(student_path, *size, seed=1)
    learner.score_teacher(batch.rollouts)
    scored = teacher_logp(batch)  # before the update (with kl=full, the update's pass may score the rest)
    spans = {}

    def timed(name, fn, *fn_args):
        t0 = time.perf_counter()
        result = fn(*fn_args)
        spans[name] = (t0, time.perf_counter())
        return result

    scorer = threading.Thread(target=timed, args=("score", learner.score_teacher, after.rollouts))
    if opts.get("concurrent"):
        scorer.start()
    metrics = timed("update", learner.update, batch.rollouts, batch.times)
    if not opts.get("concurrent"):
        scorer.start()
    scorer.join()
    weights = dict(student.full_parameters(rank))
    if rank == 0:
        saved = {"weights": weights, "metrics": metrics, "teacher_logp": teacher_logp(batch), "spans": spans}
        saved["teacher_logp_scored"] = scored
        saved["plan"] = [(r.path, r.weight) for r in batch.rollouts]  # each rollout's path and weight (Eq. 4 / 5)
        saved["zero_stage"] = student.engine.zero_optimization_stage()
        saved["teacher_placement"] = teacher.placement if teacher is not None else None
        inference = teacher if teacher is not None else reference
        saved["inference_shapes"] = (
            {n: tuple(p.shape) for n, p in inference.model.named_parameters()} if inference else {}
        )
        # engines/ds.initialize keeps DeepSpeed's Muon unimported (ZeRO-2's step imports it itself)
        saved["muon_imported"] = "deepspeed.runtime.zero.muon.muon_optimizer" in sys.modules
        torch.save({**saved, "teacher_logp_after": teacher_logp(after)}, out)


def teacher_logp(batch: Batch) -> dict[int, list[float]]:
    """Rollout index -> its teacher log-probs, for the rollouts that were scored."""
    return {i: r.teacher_logprobs for i, r in enumerate(batch.rollouts) if r.teacher_logprobs is not None}


if __name__ == "__main__":
    main()
