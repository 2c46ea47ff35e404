"""The training loop: generate -> verify -> score -> update -> sync, one global batch per step.

One loop for every schedule: ``pipeline.max_staleness = 0`` generates batch s only after the
weights of step s-1 reached the servers (synchronous); k >= 1 lets a background thread on rank 0
generate and verify batches ahead while the current one is scored and trained, never with weights
more than k versions old.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from scope_ds import stages
from scope_ds.checkpoint import export_hf
from scope_ds.run import Run, prompt_stream
from scope_ds.stages import Batch


def _timed(times: dict[str, float], name: str, fn: Callable[..., Any], *args: Any) -> Any:
    t0 = time.perf_counter()
    try:
        return fn(*args)
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0


class RolloutProducer:
    """Rank 0's source of verified batches (synchronous: each is generated when asked for)."""

    def __init__(self, run: Run, start_step: int = 0):
        self.run = run
        cfg = run.cfg
        self.prompts = prompt_stream(run.records, cfg.data.seed, start_step * cfg.train.prompts_per_step)

    def get(self, step: int) -> Batch:
        records = [next(self.prompts) for _ in range(self.run.cfg.train.prompts_per_step)]
        batch = Batch(step=step, records=records)
        _timed(batch.times, "generate", stages.generate, self.run, batch)
        _timed(batch.times, "verify", stages.verify, self.run, batch)
        return batch

    def close(self) -> None:
        pass


def evaluate(run: Run, n: int = 4) -> dict[str, float]:
    """Held-out accuracy through the rollout servers with the current weights (rank 0)."""
    if run.rank != 0 or not run.eval_records:
        return {}
    batch = Batch(step=-1, records=run.eval_records)
    prompts = [run.encode_prompt(r.prompt) for r in batch.records]
    groups = run.client.generate_many(
        prompts, run.sampling_params(), n=n, prompt_ids=[r.prompt_id for r in batch.records]
    )
    batch.rollouts = [r for g in groups for r in g]
    stages.verify(run, batch)
    return {"eval/accuracy": sum(r.correct for r in batch.rollouts) / len(batch.rollouts)}


def train(run: Run, start_step: int = 0) -> dict[str, float]:
    """Run the configured steps; returns the last step's metrics (rank 0; others: {})."""
    cfg = run.cfg
    producer = RolloutProducer(run, start_step) if run.rank == 0 else None
    last: dict[str, float] = {}
    if cfg.data.eval_every and start_step == 0:
        run.log.log(0, evaluate(run))
    try:
        for step in range(start_step, cfg.train.steps):
            t0 = time.perf_counter()
            batch = stages.share(run, producer.get(step) if producer else None)
            times = batch.times
            _timed(times, "teacher", stages.score, run, batch)
            metrics = _timed(times, "update", stages.update, run, batch)
            _timed(times, "sync", stages.sync, run)
            wall = time.perf_counter() - t0
            metrics.update({f"time/{k}": v for k, v in times.items()})
            metrics.update(
                {
                    "time/step": wall,
                    "perf/tokens_per_s": metrics["response/tokens"] / max(wall, 1e-9),
                    "policy/version": run.policy_version,
                }
            )
            if cfg.data.eval_every and (step + 1) % cfg.data.eval_every == 0:
                metrics.update(evaluate(run))
            run.log.rollouts(step + 1, batch.rollouts)
            run.log.log(step + 1, metrics)
            last = metrics if run.rank == 0 else {}
    finally:
        if producer:
            producer.close()
    if cfg.checkpoint.export_hf:
        export_hf(run, os.path.join(run.run_dir, "hf"))
    return last
