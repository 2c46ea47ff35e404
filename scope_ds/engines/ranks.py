"""The reductions over ranks that the learner and the pipeline share: sums, flags, per-row values.

Every function is a collective on the default group (or the one given) and a no-op at world size 1.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist

from scope_ds.engines.models import current_device_name

V = TypeVar("V")


class PipelineError(RuntimeError):
    """A step that cannot go on, raised alike on every rank so that every rank stops with it: a
    stage that failed on rank 0 (a server down, a refused update; pipeline.collectives.on_rank0), or
    a batch that cannot be planned into micro-batches (the learner)."""


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0 and 1 without a process group)."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def sum_over_ranks(sums: dict[str, float]) -> dict[str, float]:
    """Each key's sum over ranks (a rank may lack a key: it counts as 0)."""
    world = rank_and_world()[1]
    if world == 1:
        return sums
    keys: list[Any] = [None] * world
    dist.all_gather_object(keys, sorted(sums))
    names = sorted({k for part in keys for k in part})
    # NCCL (DeepSpeed's choice on GPUs) takes no CPU tensor
    vec = torch.tensor([sums.get(k, 0.0) for k in names], dtype=torch.float64, device=current_device_name())
    dist.all_reduce(vec)
    return dict(zip(names, vec.tolist(), strict=True))


def any_over_ranks(*flags: bool) -> list[bool]:
    """Each flag OR-ed over ranks (one all-reduce on the default group)."""
    if rank_and_world()[1] == 1:
        return list(flags)
    vec = torch.tensor([float(f) for f in flags], device=current_device_name())
    dist.all_reduce(vec, op=dist.ReduceOp.MAX)
    return [bool(v) for v in vec.tolist()]


def merge_over_ranks(part: dict[int, V], group: Any = None) -> dict[int, V]:
    """Every rank's ``part`` (disjoint keys, such as rollout index -> its row) merged, on every rank
    (a collective on ``group``)."""
    world = rank_and_world()[1]
    if world == 1:
        return part
    parts: list = [None] * world
    dist.all_gather_object(parts, part, group=group)
    return {k: v for p in parts for k, v in p.items()}
