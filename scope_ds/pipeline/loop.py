"""The training loop: one global batch per step, in the order things happen.

    generate -> verify (rank 0's RolloutProducer thread)
    -> score (every rank's ScoredFeed thread)
    -> update -> sync (the trainer, this thread)
    -> log / save / evaluate

One loop for every schedule: ``pipeline.max_staleness`` = 0 is the synchronous one (batch s is
generated only once step s-1's weights are on the servers); k >= 1 lets generation run up to k
policy versions ahead of the update (see feed.py and versions.py).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from scope_ds import checkpoint
from scope_ds.pipeline import stages
from scope_ds.pipeline.collectives import PipelineError, on_rank0, stop_requested
from scope_ds.pipeline.feed import RolloutProducer, ScoredFeed, timed
from scope_ds.pipeline.run import Run
from scope_ds.records import Batch

BUSY_STAGES = ("generate", "verify", "teacher", "update", "sync")
# Mean |log(pi_old / pi_behaviour)| per token above which on-policy rollouts point at a convention
# error, not at numerics: bf16 and a KV cache move it by hundredths; a temperature mismatch by tenths.
MISMATCH_WARN = 0.1


@dataclass
class Progress:
    """Where the loop stands, for the save on the way out whatever ends it."""

    start: int  # the first step of this process (a resumed run: the checkpoint's)
    done: int  # steps whose update is applied
    stopped: bool = False  # asked to stop (a signal), or by a server going down with it
    last: dict[str, float] = field(default_factory=dict)  # the last step's metrics (rank 0)
    generated: int = 0  # tokens the servers generated for the trained batches
    thrown: int = 0  # of them, tokens thrown away (samples generated again)


def train(run: Run) -> dict[str, float]:
    """Run (or resume) the configured steps; returns the last step's metrics (rank 0; others: {})."""
    start, pending, in_flight = restore(run)
    producer = RolloutProducer(run, start, pending, in_flight) if run.rank == 0 else None
    feed = ScoredFeed(run, producer, start)
    if run.cfg.data.eval_every and start == 0:
        run.log.log(0, on_rank0(evaluate, run))
    progress = Progress(start, start)
    try:
        for step in range(start, run.cfg.train.steps):
            t0 = time.perf_counter()
            batch = feed.get(step)  # generated, verified and scored; None: asked to stop meanwhile
            if batch is None:
                progress.stopped = True
                save(run, progress.done, producer)
                break
            train_step(run, step, batch, producer, progress, t0)
            if progress.stopped:
                break
    except PipelineError:
        save(run, progress.done, producer)  # a server down: keep what was trained, then report
        if not stop_requested():
            raise
        progress.stopped = True  # a signal to the launcher's whole tree takes the rollout server down too
    finally:
        feed.close()
    finish(run, progress)
    return progress.last


def train_step(
    run: Run, step: int, batch: Batch, producer: RolloutProducer | None, progress: Progress, t0: float
) -> None:
    """Update, sync, log, maybe evaluate and save, for the batch of ``step``."""
    cfg = run.cfg
    staleness = staleness_metrics(run, batch)
    metrics = timed(batch.times, "update", stages.update, run, batch)
    done = progress.done = step + 1
    staged = None
    if producer and cfg.pipeline.sync_between_batches and cfg.pipeline.max_staleness:
        # once the weights are written: the next batch, if its samples are under way,
        # finishes on the weights it began with; then the servers pause for the new ones
        staged = functools.partial(wait_generated, producer, batch, done)
    sync(run, batch, metrics, done, staged)
    if producer:
        producer.advanced()
    metrics.update(staleness)
    progress.generated += staleness["rollout/generated_tokens"]
    progress.thrown += staleness["rollout/regenerated_tokens"]
    metrics.update(step_metrics(run, batch, time.perf_counter() - t0))
    if done == progress.start + 1:
        check_mismatch(run, metrics)
    if cfg.data.eval_every and done % cfg.data.eval_every == 0:
        metrics.update(on_rank0(evaluate, run))
    record(run, done, batch, metrics)
    progress.last = metrics if run.rank == 0 else {}
    progress.stopped = stop_requested()
    if progress.stopped or done == cfg.train.steps or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0):
        save(run, done, producer)


def finish(run: Run, progress: Progress) -> None:
    """The run's closing lines, and the Hugging Face export of a run that was not stopped."""
    generated, thrown = progress.generated, progress.thrown
    if generated:
        run.log.message(
            f"rollouts: {generated} tokens generated for steps {progress.start + 1}-{progress.done}, {thrown} of "
            f"them thrown away ({100 * thrown / generated:.1f}%)"
        )
    if progress.stopped:
        run.log.message(f"stopped by a signal after step {progress.done}; resume with checkpoint.resume=auto")
    elif run.cfg.checkpoint.export_hf:
        checkpoint.export_hf(run, os.path.join(run.run_dir, "hf"))


def restore(run: Run) -> tuple[int, list[Batch], Batch | None]:
    """(first step, batches generated ahead, the batch that was being generated) after
    ``checkpoint.resume``; (0, [], None) for a new run.

    A resumed run also truncates the logs to the checkpoint's step and pushes the restored weights
    to the rollout servers, which then serve the checkpoint's policy version.
    """
    folder = checkpoint.find_checkpoint(run.cfg.checkpoint.resume, checkpoint.checkpoint_root(run))
    if folder is None:  # resume=auto before any complete save: what an earlier try logged is void
        run.log.resume_at(-1)
        return 0, [], None
    state = checkpoint.load(run, folder)
    run.log.resume_at(state.step)
    run.log.message(f"resumed from {folder} (step {state.step}, policy version {state.policy_version})")
    stages.sync(run)
    return state.step, state.pending, state.in_flight


def wait_generated(producer: RolloutProducer, batch: Batch, step: int) -> None:
    """Wait while the batch of ``step`` is being generated; the seconds go to ``time/wait_generated``."""
    batch.times["wait_generated"] = producer.wait_generated(step)


def sync(
    run: Run, batch: Batch, metrics: dict[str, float], done: int, staged: Callable[[], None] | None = None
) -> None:
    """The weight sync after the update of step ``done``; ``staged`` runs inside it, once the
    weights are ready to go (see stages.sync), and its wait for the batch under way is logged as
    ``time/wait_generated``, not as sync time. If the sync fails, the step is logged all the same:
    its update is applied, and the checkpoint saved on the way out holds it."""
    try:
        timed(batch.times, "sync", stages.sync, run, staged)
    except PipelineError:
        record(run, done, batch, metrics)
        raise
    finally:
        batch.times["sync"] -= batch.times.get("wait_generated", 0.0)


def record(run: Run, step: int, batch: Batch, metrics: dict[str, float]) -> None:
    """Log the step's rollouts and metrics (rank 0 writes; a failure, a full disk say, reaches every
    rank as a PipelineError naming the file, and the run saves what it trained)."""
    on_rank0(_write_step, run, step, batch, metrics)


def _write_step(run: Run, step: int, batch: Batch, metrics: dict[str, float]) -> None:  # rank 0
    run.log.rollouts(step, batch.rollouts)
    run.log.log(step, metrics)


def save(run: Run, step: int, producer: RolloutProducer | None) -> None:
    pending, in_flight = producer.snapshot() if producer else ([], None)
    folder = checkpoint.save(run, step, pending, in_flight)
    kept = [r for g in in_flight.samples for r in g if r is not None] if in_flight else []
    tokens = sum(r.response_length for r in kept)
    run.log.message(
        f"checkpoint {folder}" + (f" ({len(kept)} samples in flight, {tokens} tokens so far)" if kept else "")
    )


def evaluate(run: Run) -> dict[str, float]:
    """Held-out Avg@n / Pass@k (n = data.eval_n) through the rollout servers with the current
    weights (rank 0). The same per-sample seeds at every evaluation, so that the curve moves with
    the weights only."""
    from scope_ds.evaluation import evaluate_records

    if not run.eval_records:
        return {}
    return evaluate_records(
        run.rollout.eval_client,
        run.tokenizer,
        run.eval_records,
        run.verifier.name,  # the main thread: math-verify's own timeouts hold here
        run.cfg.data.eval_n,
        stages.sampling_params(run),
        chat_template=run.cfg.data.chat_template,
        seed=run.cfg.train.seed,
    )


def staleness_metrics(run: Run, batch: Batch) -> dict[str, float]:
    """The batch's segments (a rollout continued across a weight update has several) and how many
    versions the policy about to be updated is ahead of each rollout's oldest token (before the
    update). KD's rollouts come from the (fixed) teacher: no staleness."""
    rs = batch.rollouts
    segments = [max(1, len(r.segments)) for r in rs]
    generated = sum(max(r.generated_tokens, r.response_length) for r in rs)
    out = {
        "rollout/partial_share": sum(s > 1 for s in segments) / len(rs),
        "rollout/segments_mean": sum(segments) / len(rs),
        "rollout/generated_tokens": generated,
        "rollout/regenerated_tokens": generated - sum(r.response_length for r in rs),
    }
    if run.algo.uses_teacher_rollouts:
        return out
    lag = [run.versions.behind(r.weight_version) for r in rs]  # weight_version: the oldest token's
    return {**out, "staleness/mean": sum(lag) / len(lag), "staleness/max": max(lag)}


def check_mismatch(run: Run, metrics: dict[str, float]) -> None:
    """One line when the first step's on-policy rollouts disagree with the trainer's pi_old by far
    more than rounding: the server reports its log-probs under another convention."""
    gap = metrics.get("mismatch/abs_log_ratio")
    if gap is None or metrics.get("staleness/max", 0) != 0 or gap <= MISMATCH_WARN:
        return
    run.log.message(
        f"mismatch: the rollout servers' log-probs differ from the trainer's by {gap:.3f} nats per token on "
        "on-policy rollouts: they follow another convention. scope_ds takes them at rollout.temperature; an "
        "SGLang server started with SGLANG_RETURN_ORIGINAL_LOGPROB=1 reports them at temperature 1 (docs/rollout.md)"
    )


def step_metrics(run: Run, batch: Batch, wall: float) -> dict[str, float]:
    """Stage times, overlap and throughput of one step (besides the update's own metrics)."""
    busy = sum(batch.times.get(k, 0.0) for k in BUSY_STAGES)
    out = {f"time/{k}": v for k, v in batch.times.items()}
    tokens = sum(r.response_length for r in batch.rollouts)
    out.update({"time/step": wall, "pipeline/overlap": busy / max(wall, 1e-9), "policy/version": run.versions.student})
    out["perf/tokens_per_s"] = tokens / max(wall, 1e-9)
    out["reward/verify_timeouts"] = batch.verify_timeouts
    return out
