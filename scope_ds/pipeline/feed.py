"""The two background feeds of the trainer: verified batches (rank 0) and scored batches (every rank).

- ``RolloutProducer`` (rank 0): generates and verifies the batch of step s as soon as every
  rollout server holds a policy version at most ``pipeline.max_staleness`` behind the one that
  will train it (k = 0: the synchronous schedule), keeping at most ``pipeline.queue_size`` ready.
- ``ScoredFeed`` (every rank): takes each verified batch from rank 0's producer, shares it with
  every rank and scores it with the teacher, on its own process group (``run.score_group``), at
  most one batch ahead of the trainer: beside the update with ``pipeline.overlap_teacher``,
  otherwise only while the trainer waits for it.
Both are a ``_Worker``: one thread, one condition, and the thread's error raised in the trainer.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

from scope_ds.data.stream import prompt_stream
from scope_ds.engines.models import bind_device, current_device
from scope_ds.pipeline import stages
from scope_ds.pipeline.collectives import PipelineError, on_rank0, stop_signalled
from scope_ds.pipeline.run import Run
from scope_ds.records import Batch
from scope_ds.rollout.client import RolloutServerError


def timed(times: dict[str, float], name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, adding its wall time to ``times[name]``."""
    t0 = time.perf_counter()
    try:
        return fn(*args)
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0


WAITING = object()  # what _Worker._take returns when nothing came in time
STOP = "stop"  # what rank 0's scorer shares instead of a batch once it is asked to stop
POLL_S = 0.5  # how often a wait looks at the stop flag
HOLD_TIMEOUT_S = 60.0  # a checkpoint's wait for the samples in flight to stand still


class _Worker:
    """A daemon thread that fills ``self._queue`` for one consumer, under one condition.

    Subclasses write ``_work``; the consumer takes items with ``_take``, which raises the thread's
    error (a PipelineError on every rank) instead of waiting for an item that will never come.
    """

    what = "work"  # named in the consumer's error

    def __init__(self, name: str, timeout_s: float) -> None:
        self._cond = threading.Condition()
        self._queue: collections.deque[Batch] = collections.deque()
        self._error: BaseException | None = None
        self._closing = False
        self._timeout_s = timeout_s
        self._upstream: _Worker | None = None  # the worker this one takes from: closed before joining
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _work(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        try:
            self._work()
        except BaseException as e:  # handed to the consumer by _take
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def _wait(self, ready: Callable[[], bool]) -> bool:
        """In the thread: wait until ``ready()`` or closing; False when closing."""
        with self._cond:
            self._cond.wait_for(lambda: self._closing or ready())
            return not self._closing

    def _put(self, batch: Batch) -> None:
        with self._cond:
            self._queue.append(batch)
            self._cond.notify_all()

    def _take(self, timeout_s: float | None = None) -> Batch | None | object:
        """In the consumer: the next item; None once closing; WAITING when nothing came within
        ``timeout_s``; raises the thread's error (as a PipelineError)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._queue or self._error is not None or self._closing, timeout_s):
                return WAITING
            if self._queue:
                batch = self._queue.popleft()
                self._cond.notify_all()
                return batch
            if self._error is None:
                return None
            if isinstance(self._error, PipelineError):
                raise self._error
            raise PipelineError(f"{self.what} failed: {self._error}") from self._error

    def close(self) -> None:
        """Stop the thread (and the upstream worker it may be waiting on), then join it."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._upstream is not None:
            self._upstream.close()
        self._thread.join(timeout=self._timeout_s)


def take_or_stop(take: Callable[[float], Any], timeout_s: float, what: str) -> Any:
    """``take(POLL_S)`` until it gives an item (None: closing); STOP as soon as this process is
    asked to stop; a PipelineError naming ``what`` once nothing came for ``timeout_s``."""
    t0 = time.perf_counter()
    while True:
        got = take(POLL_S)
        if got is not WAITING:
            return got
        if stop_signalled():
            return STOP
        if time.perf_counter() - t0 > timeout_s:
            raise PipelineError(f"{what}: nothing came for {timeout_s:g} s (pipeline.wait_timeout_s)")


class RolloutProducer(_Worker):
    """Rank 0's source of verified batches, generated ahead by a background thread."""

    what = "rollout generation"

    def __init__(self, run: Run, start_step: int, pending: list[Batch] = (), in_flight: Batch | None = None) -> None:
        """``pending``: batches generated before a checkpoint (steps start_step, start_step + 1, ...);
        ``in_flight``: the batch a checkpoint caught being generated (the step after them), whose
        samples are continued from their saved tokens."""
        super().__init__("rollouts", run.cfg.rollout.request_timeout_s)
        self.run = run
        self._first_new = start_step + len(pending)
        self.prompts = prompt_stream(run.records, run.cfg.data.seed, self._first_new * run.cfg.train.prompts_per_step)
        self._queue.extend(pending)
        self._taken: list[Batch] = []  # handed to the scorer, not yet to the trainer
        self._resumed = in_flight
        self._current: Batch | None = None  # being generated or verified
        self._generating: int | None = None  # the step whose batch the servers are generating
        self._thread.start()

    def _work(self) -> None:
        p = self.run.cfg.pipeline
        for step in range(self._first_new, self.run.cfg.train.steps):
            if not self._wait(lambda: len(self._queue) < p.queue_size):
                return
            t0 = time.perf_counter()  # held back by the staleness bound from here
            if not self._wait(lambda s=step: self.run.versions.may_generate(s, p.max_staleness)):
                return
            records = [next(self.prompts) for _ in range(self.run.cfg.train.prompts_per_step)]
            batch, self._resumed = self._resumed or Batch(step=step, records=records), None
            batch.times["wait_version"] = time.perf_counter() - t0
            with self._cond:
                self._current, self._generating = batch, step
            try:
                timed(batch.times, "generate", stages.generate, self.run, batch)
            finally:
                with self._cond:
                    self._generating = None
                    self._cond.notify_all()
            timed(batch.times, "verify", stages.verify, self.run, batch)
            if stop_signalled() and batch.verify_timeouts:
                return  # its verifier may have been killed with the run: a checkpoint keeps it in flight
            with self._cond:
                batch.samples, self._current = None, None
                self._queue.append(batch)
                self._cond.notify_all()

    def get(self, timeout_s: float | None = None) -> Batch | None | object:
        """The next batch, in step order (None once closing; WAITING if none came in ``timeout_s``)."""
        batch = self._take(timeout_s)
        if isinstance(batch, Batch):
            with self._cond:
                self._taken.append(batch)
        return batch

    def release(self, step: int) -> None:
        """The trainer holds the batch of ``step``: no longer pending."""
        with self._cond:
            self._taken = [b for b in self._taken if b.step != step]

    def snapshot(self) -> tuple[list[Batch], Batch | None]:
        """What a checkpoint keeps: the batches generated but not yet trained on, in step order,
        and a copy of the batch being generated with its samples' tokens so far.

        The copy is taken while the rollout client holds every sample still (``held``: the
        requests out are aborted, their tokens stitched into the samples, which then go on). If
        that fails (a server down), the checkpoint goes without the batch in flight and a resumed
        run generates it again, which the run's log says.
        """

        def take() -> tuple[list[Batch], Batch | None]:
            with self._cond:
                current = self._current and Batch.from_json(self._current.to_json())
                return [*self._taken, *self._queue], current

        pending, current = take()
        if current is None:
            return pending, None
        try:
            return self.run.rollout.client.held(take, timeout_s=HOLD_TIMEOUT_S)
        except (RolloutServerError, TimeoutError) as e:
            self.run.log.message(
                f"checkpoint without the samples of step {current.step + 1} in flight ({e}): a resume generates "
                "them again"
            )
            return pending, None

    def wait_generated(self, step: int) -> float:
        """Wait while the batch of ``step`` is being generated (not for a batch not yet started:
        it may be waiting for the very weights the caller is about to push); returns the seconds
        waited. Returns early when this process is asked to stop or the producer stops."""
        t0 = time.perf_counter()
        with self._cond:
            while self._generating == step and not self._closing and not stop_signalled():
                self._cond.wait(POLL_S)
        return time.perf_counter() - t0

    def advanced(self) -> None:
        """The servers hold a newer version (run.versions): a batch waiting for it may start."""
        with self._cond:
            self._cond.notify_all()


class ScoredFeed(_Worker):
    """The trainer's feed of scored batches: every rank's teacher-scoring thread.

    Every rank follows rank 0's broadcasts (on ``run.score_group``), so all ranks score the same
    batches, also while closing; the trainer's collectives stay on the default group.
    """

    what = "teacher scoring"

    def __init__(self, run: Run, producer: RolloutProducer | None, start_step: int) -> None:
        super().__init__("scorer", run.cfg.rollout.request_timeout_s)
        self.run, self.producer = run, producer
        self._upstream = producer
        self.overlap = run.cfg.pipeline.overlap_teacher  # validated: gloo, no full-vocabulary KL
        self._device = current_device()  # per thread on GPUs: the thread binds it
        self._spans: dict[int, tuple[float, float]] = {}  # step -> when it was scored
        # The step the trainer waits for: without overlap, scoring runs only then (the trainer's
        # own collectives, an evaluation before the first step included, are done by then).
        self._wanted = start_step - 1
        self._start_step = start_step
        self._thread.start()

    def _may_score(self, step: int) -> bool:
        return not self._queue and (self.overlap or self._wanted >= step)

    def _next_batch(self) -> Batch | str | None:  # rank 0
        """The producer's next batch; STOP once this rank is asked to stop (shared like a batch, so
        every rank's trainer ends its wait at once, with no collective of its own meanwhile: the
        teacher may be gathering on the default group); None when closing."""
        if self._closing:
            return None
        return take_or_stop(self.producer.get, self.run.cfg.pipeline.wait_timeout_s, self.producer.what)

    def _work(self) -> None:
        bind_device(self._device)
        for step in range(self._start_step, self.run.cfg.train.steps):
            # Not a return on closing: rank 0 says when to stop (None), so that every rank
            # finishes the batch already shared.
            self._wait(lambda s=step: self._may_score(s))
            batch = on_rank0(self._next_batch, group=self.run.score_group)
            if batch is None:
                return
            if batch == STOP:
                self._put(STOP)
                return
            t0 = time.perf_counter()
            timed(batch.times, "teacher", stages.score, self.run, batch)
            with self._cond:
                self._spans[batch.step] = (t0, time.perf_counter())
            self._put(batch)

    def get(self, step: int) -> Batch | None:
        """The scored batch of ``step``, or None on every rank once rank 0 is asked to stop while
        they wait (the batch stays pending in rank 0's producer: the checkpoint keeps it).

        Raises the scorer's error on every rank (a PipelineError when generation failed on rank
        0), or a PipelineError after ``pipeline.wait_timeout_s``.
        """
        t0 = time.perf_counter()
        with self._cond:
            self._wanted = step
            self._cond.notify_all()
        timeout_s = self.run.cfg.pipeline.wait_timeout_s
        batch = self._take(timeout_s)
        if batch is WAITING:
            raise PipelineError(f"{self.what}: nothing came for {timeout_s:g} s (pipeline.wait_timeout_s)")
        if batch is None:
            raise PipelineError("the scored-batch feed closed before the trainer's last step")
        if batch == STOP:
            return None
        with self._cond:
            start, end = self._spans.pop(batch.step)
        if self.producer:
            self.producer.release(batch.step)
        t1 = time.perf_counter()  # idle: waiting, less the scoring of this batch meanwhile
        batch.times["idle"] = (t1 - t0) - max(0.0, min(t1, end) - max(t0, start))
        return batch
