"""What crosses ranks outside the engines: rank 0's objects to every rank, and the stop flag (the
sums and flags over ranks are engines/ranks.py's, shared with the learner).

Rank 0 alone speaks HTTP (rollout servers), so whatever it learns reaches the other ranks here; a
failure on rank 0 reaches them too, as a PipelineError, instead of leaving them in a collective.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

from scope_ds.engines.ranks import PipelineError, any_over_ranks, rank_and_world

T = TypeVar("T")
_stop = threading.Event()  # set by SIGTERM / SIGINT / SIGUSR1: save the last finished step, then stop


@dataclass
class Failure:
    """What rank 0 shares instead of a result when its work failed, so every rank stops."""

    message: str


def share(obj: T, group: Any = None) -> T:
    """Rank 0's object on every rank (one broadcast of Python objects, on ``group``)."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def on_rank0(fn: Callable[..., T], *args: Any, group: Any = None) -> T:
    """``fn(*args)`` on rank 0, its result on every rank. If it raises, every rank raises (rank 0's
    error as cause) instead of waiting forever in the next collective."""
    result, error = None, None
    if rank_and_world()[0] == 0:
        try:
            result = fn(*args)
        except Exception as e:
            error, result = e, Failure(f"{type(e).__name__}: {e}")
    got = share(result, group)
    if isinstance(got, Failure):
        raise PipelineError(got.message) from error
    return got


def request_stop(signum: int | None = None, frame: Any = None) -> None:
    """Signal handler: save a checkpoint of the last finished step, exit cleanly."""
    _stop.set()


def stop_signalled() -> bool:
    """This rank was asked to stop (no collective: for the threads, and for waits that poll)."""
    return _stop.is_set()


def stop_requested() -> bool:
    """True on every rank if any rank was signalled (SLURM may signal only some of them)."""
    return any_over_ranks(_stop.is_set())[0]


def score_group() -> Any:
    """A second, gloo (CPU) process group over every rank (a collective: every rank calls it, once).

    The scoring thread (feed.ScoredFeed) shares batches and scores on it while the trainer
    thread's collectives use the default group, so the two never interleave on one communicator.
    """
    return dist.new_group(list(range(dist.get_world_size())), backend="gloo")


def default_backend() -> str:
    return dist.get_backend()
