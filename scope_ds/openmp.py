"""OpenMP's wait policy for the processes we start: passive unless the user chose one.

By default OpenMP's idle threads spin for a while after each parallel region. Beside another busy
process on few cores (a rank beside its embedded rollout server, generation running during the
update) they spin on the core the other process needs. OpenMP reads ``OMP_WAIT_POLICY`` once,
when torch loads it: set it before ``import torch``. Standard library only.
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
