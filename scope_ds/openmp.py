"""OpenMP's wait policy and thread counts for the processes we start.

By default OpenMP's idle threads spin for a while after each parallel region. Beside another busy
process on few cores (a rank beside its embedded rollout server, generation running during the
update) they spin on the core the other process needs. OpenMP reads ``OMP_WAIT_POLICY`` once,
when torch loads it: set it before ``import torch``. Standard library only.

Threads: an embedded rollout server takes ``server_threads`` of its host's cores, and the trainer's
ranks on that host share the rest (engines/ds.py ``default_threads``), so that the two never ask
for more threads than there are cores (docs/bench_peer.md measures both ways).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

WAIT_POLICY = "OMP_WAIT_POLICY"


def passive_waits(env: MutableMapping[str, str] = os.environ) -> MutableMapping[str, str]:
    """``env`` (this process's environment by default) with ``OMP_WAIT_POLICY=PASSIVE`` unless it
    has one already; returned for chaining."""
    env.setdefault(WAIT_POLICY, "PASSIVE")
    return env


def server_threads(cores: int) -> int:
    """Intra-op threads of an embedded rollout server on a host of ``cores``: half of them, 1-8.
    Generation steps are small; more threads only wait on each other."""
    return max(1, min(8, cores // 2))
