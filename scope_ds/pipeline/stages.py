"""The stages of one training step, each a function of the run's parts and a batch.

generate -> verify (rank 0, over HTTP) -> score (teacher, every rank) -> update (student, every
rank) -> sync (weights to the rollout servers). The loop (loop.py) and the feeds (feed.py) decide
when each runs; nothing here knows about threads. The arithmetic of scoring and updating (micro-
batches, collation, the passes, what crosses ranks) is the learner's (engines/learner.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from scope_ds.config import Config
from scope_ds.data import encoding
from scope_ds.pipeline.collectives import on_rank0
from scope_ds.pipeline.run import Run
from scope_ds.records import Batch

# ---------------------------------------------------------------------------------- rank 0 (HTTP)


def generate(run: Run, batch: Batch) -> None:
    """Sample ``rollout.n`` rollouts per prompt from the rollout servers (rank 0), continuing the
    batch's ``samples`` where a checkpoint saved them in flight."""
    chat = run.cfg.data.chat_template
    n = run.cfg.rollout.n
    if batch.samples is None:
        batch.samples = [[None] * n for _ in batch.records]
    groups = run.rollout.client.generate_many(
        [encoding.encode_prompt(run.tokenizer, r.prompt, chat) for r in batch.records],
        sampling_params(run),
        n=run.cfg.rollout.n,
        prompt_ids=[r.prompt_id for r in batch.records],
        group_ids=[f"{batch.step}:{i}" for i in range(len(batch.records))],
        seeds=sample_seeds(run.cfg, batch.step, len(batch.records)),
        samples=batch.samples,
    )
    batch.rollouts = [r for group in groups for r in group]


def sampling_params(run: Run) -> dict:
    """The run's sampling parameters (rollout section), with the tokenizer's stop token."""
    c = run.cfg.rollout
    return encoding.sampling_params(run.tokenizer, c.temperature, c.top_p, c.top_k, c.max_new_tokens)


def sample_seeds(cfg: Config, step: int, prompts: int) -> list[int] | None:
    """Per-prompt sampling seeds of a step (sample j of prompt i uses seeds[i] + j), or None."""
    if not cfg.rollout.seeded:
        return None
    n = cfg.rollout.n
    base = (cfg.train.seed * 1_000_003 + step) * prompts
    return [((base + i) * n) % 2**62 for i in range(prompts)]


def verify(run: Run, batch: Batch) -> None:
    """Decode each response and route it by the verifier's reward (rank 0), in the verifier's own
    processes with a deadline per answer (``data.verify_timeout_s``: past it, incorrect)."""
    n = len(batch.rollouts) // len(batch.records)  # prompt-major: n rollouts per record
    answers = [batch.records[i // n].answer for i in range(len(batch.rollouts))]
    batch.verify_timeouts = encoding.decode_and_verify_all(
        run.tokenizer, batch.rollouts, answers, run.verifier.verify, run.cfg.data.truncated
    )


# ---------------------------------------------------------------------------------- every rank


def score(run: Run, batch: Batch) -> None:
    """Teacher log-probs of the rollouts the algorithm needs them for before the update, on every
    rank (engines.learner.Learner.score_teacher; it may run beside the update, feed.ScoredFeed)."""
    run.learner.score_teacher(batch.rollouts)


def update(run: Run, batch: Batch) -> dict[str, float]:
    """One optimizer step of the student on this rank's share of the batch (the learner's); metrics
    summed over ranks. The student is one policy version further afterwards."""
    metrics = run.learner.update(batch.rollouts, batch.times)
    run.versions.stepped()
    return metrics


def sync(run: Run, staged: Callable[[], None] | None = None) -> None:
    """Push the student's weights, labelled with its policy version, to the rollout servers
    (every rank takes part in the gather); afterwards every server holds that version. KD's
    rollout servers serve the fixed teacher: they count as synced at once, and the weights go
    only to its evaluation server, if it has one (see Run.pushes_weights). ``staged()`` (rank 0)
    runs once the weights are ready to go, before the servers are paused: the disk sync has
    written its folder by then."""
    if run.pushes_weights:
        params = run.student.full_parameters(run.rank)
        on_rank0(_push, run, params, staged)
    elif staged is not None and run.rank == 0:
        staged()
    run.versions.synced()


def _push(run: Run, params: Iterator[tuple[str, torch.Tensor]], staged: Callable[[], None] | None) -> None:  # rank 0
    try:
        run.rollout.weight_sync.update(params, run.versions.student, staged)
    finally:
        for _ in params:  # rank 0 must finish the gather, also after an error here
            pass
