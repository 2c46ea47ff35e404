"""Verification with a real deadline: the verifier runs in worker processes, never in the trainer.

math-verify bounds its own parsing and comparison with SIGALRM, which works only in a process's
main thread; the trainer verifies in its rollout thread, where one pathological answer (say
``\\boxed{(x+1)^{100000}}``) would hang generation for good. A worker's tasks run in its main
thread, so math-verify's own timeouts hold there, and the pool adds a hard deadline on top: when a
batch runs past it, the workers are killed and restarted, and every answer not verified by then
counts as incorrect (and as a timeout, for the metrics).
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from scope_ds.rewards import get_verifier


def _verify(name: str, response: str, answer: str) -> float:  # in a worker
    return float(get_verifier(name)(response, answer))


def _worker_init(parent_pid: int) -> None:
    """A worker writes nowhere the trainer's callers read, and ends when the trainer is gone (a
    kill -9 included): an orphan holding the trainer's stdout would keep a launcher's caller
    waiting for good. (Not a parent-death signal: that follows the creating thread, and a worker
    killed while it holds the pool's queue lock would deadlock the pool.)"""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class VerifierPool:
    """``verify(pairs)`` -> (rewards, timeouts) for the registered verifier ``name``."""

    def __init__(self, name: str, timeout_s: float, workers: int = 1) -> None:
        """``timeout_s``: the longest one answer may take (a batch of n gets n times that, at most)."""
        get_verifier(name)  # an unknown name fails here, not in a worker
        self.name, self.timeout_s, self.workers = name, timeout_s, workers
        # spawn, not fork: the trainer has threads (and torch's) that a fork would copy mid-state
        self._ctx = mp.get_context("spawn")
        self._pool = self._new_pool()

    def verify(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[float], int]:
        """Each (response, answer)'s reward; an answer not verified within ``timeout_s`` of its
        start gets 0.0 and counts as a timeout (the others are verified as usual)."""
        rewards = [0.0] * len(pairs)
        todo, running, timeouts = collections.deque(range(len(pairs))), {}, 0
        while todo or running:
            while todo and len(running) < self.workers:
                i = todo.popleft()
                running[i] = (self._pool.apply_async(_verify, (self.name, *pairs[i])), time.monotonic())
            oldest = min(running, key=lambda i: running[i][1])
            task, started = running[oldest]
            task.wait(max(0.0, started + self.timeout_s - time.monotonic()))
            for i in [i for i, (t, _) in running.items() if t.ready()]:
                t, _ = running.pop(i)
                rewards[i] = t.get() if t.successful() else 0.0
            if oldest in running:  # past its deadline: kill the stuck worker, retry the others
                del running[oldest]
                timeouts += 1
                todo.extendleft(sorted(running, reverse=True))
                running.clear()
                self._pool.terminate()
                self._pool = self._new_pool()
        return rewards, timeouts

    def _new_pool(self) -> Any:
        return self._ctx.Pool(self.workers, initializer=_worker_init, initargs=(os.getpid(),))

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()
