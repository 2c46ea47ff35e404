"""Verification with a real deadline: the verifier runs in a worker process, never in the trainer.

math-verify bounds its own parsing and comparison with SIGALRM, which works only in a process's
main thread; the trainer verifies in its rollout thread, where one pathological answer (say
``\\boxed{(x+1)^{100000}}``) would hang generation for good. The worker verifies in its main
thread, so math-verify's own timeouts hold there, and the trainer adds a hard deadline on top: an
answer not verified in time counts as incorrect (and as a timeout, for the metrics), and the
worker is killed and started afresh.

One process and one pipe, not a multiprocessing.Pool: a pool worker killed while it holds the
pool's queue lock (SLURM signals every process of a job step) deadlocks the pool's shutdown.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

from scope_ds.rewards import get_verifier


def _serve(conn: Any, parent_pid: int) -> None:  # the worker's main thread
    # SLURM's pre-timeout SIGUSR1 reaches every process of the step: it is the trainer's to handle
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_WRONLY)  # never hold the trainer's stdout (its reader would wait)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        name, response, answer = msg
        try:
            conn.send(float(get_verifier(name)(response, answer)))
        except Exception:  # noqa: BLE001 - a verifier error means "not verified"
            conn.send(0.0)


def _exit_with_parent(parent_pid: int) -> None:
    """End the worker once the trainer is gone (a kill -9 included)."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


class VerifierPool:
    """``verify(pairs)`` -> (rewards, timeouts) for the registered verifier ``name``."""

    def __init__(self, name: str, timeout_s: float) -> None:
        """``timeout_s``: the longest one answer may take."""
        get_verifier(name)  # an unknown name fails here, not in the worker
        self.name, self.timeout_s = name, timeout_s
        # spawn, not fork: the trainer has threads (and torch's) that a fork would copy mid-state
        self._ctx = mp.get_context("spawn")
        self._start()

    def _start(self) -> None:
        self._conn, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_serve, args=(child, os.getpid()), name="verifier", daemon=True)
        self._proc.start()
        child.close()

    def _restart(self) -> None:
        self._proc.kill()
        self._proc.join(5)
        self._conn.close()
        self._start()

    def verify(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[float], int]:
        """Each (response, answer)'s reward; an answer not verified within ``timeout_s`` gets 0.0
        and counts as a timeout (a worker that died counts the same, and is started again)."""
        rewards, timeouts = [], 0
        for response, answer in pairs:
            try:
                self._conn.send((self.name, response, answer))
                if self._conn.poll(self.timeout_s):
                    rewards.append(self._conn.recv())
                    continue
            except (EOFError, OSError):
                pass
            rewards.append(0.0)
            timeouts += 1
            self._restart()
        return rewards, timeouts

    def close(self) -> None:
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._proc.join(2)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()
