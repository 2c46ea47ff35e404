"""A process group that joins the trainer and the rollout servers, outside the default group.

The trainer already has its own default (training) group, so the weight-update group must be a
second, independent one. SGLang's server side builds it as: TCP rendezvous at
``tcp://master_address:master_port`` (the trainer, rank 0, hosts the store), a ``PrefixStore``
named after ``group_name``, then torch's process-group constructor. Both ends here do exactly the
same so that the trainer meets a real SGLang server as well as the embedded one.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


def init_custom_group(
    backend: str,
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    timeout_s: float = 300.0,
    rendezvous_timeout_s: float | None = None,
) -> dist.ProcessGroup:
    """Join (rank 0: create) the group; blocks until all ``world_size`` ranks have joined.

    ``rendezvous_timeout_s`` (default ``timeout_s``) bounds the join; ``timeout_s`` each collective."""
    timeout = datetime.timedelta(seconds=timeout_s)
    join = datetime.timedelta(seconds=timeout_s if rendezvous_timeout_s is None else rendezvous_timeout_s)
    store, rank, world_size = next(
        dist.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=join)
    )
    store.set_timeout(join)
    store = dist.PrefixStore(group_name, store)
    # torch has no public constructor for a group outside the default one; every RL framework
    # (SGLang, slime, OpenRLHF, verl) uses this helper, so its signature is watched upstream.
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], backend, store, group_name=group_name, timeout=timeout)
    # Collectives look up group ranks in this table; the group's ranks are the global ranks 0..N-1.
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def broadcast(tensor: torch.Tensor, group: dist.ProcessGroup, src: int = 0) -> None:
    """Broadcast ``tensor`` in place from group rank ``src`` (blocks until done)."""
    dist.broadcast(tensor, src=src, group=group)


def destroy_group(group: dist.ProcessGroup) -> None:
    dist.destroy_process_group(group)


# The embedded server keeps its model on the CPU, so it receives with gloo whatever the trainer
# asks for, and says so in /server_info; a trainer that sees it uses gloo too (see distributed.py).
EMBEDDED_BACKEND = "gloo"
