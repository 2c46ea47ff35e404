"""The DeepSpeed launcher above the ranks: noticing when it goes, so that the ranks save and stop.

``deepspeed scope_ds/train.py`` is three layers of processes: the ``deepspeed`` command
(DeepSpeed's runner), which starts ``python -m deepspeed.launcher.launch``, which starts one process
per rank. On one node the runner installs no signal handler: a SIGTERM or SIGINT ends it at once,
while launch.py and the ranks go on, unseen. So each rank watches the two processes above it and,
when either is gone, asks itself to stop: save the last finished step and exit 0 (which launch.py,
still there, passes on).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

_LAUNCH_MODULE = "deepspeed.launcher.launch"
_RUNNER_MODULE = "deepspeed.launcher.runner"


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _parent(pid: int) -> int | None:
    """``pid``'s parent (from /proc; None when ``pid`` is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _is_runner(args: list[str]) -> bool:
    """The ``deepspeed`` command (its script) or ``python -m deepspeed.launcher.runner``."""
    return _RUNNER_MODULE in args or any(os.path.basename(a) == "deepspeed" for a in args[:2])


def launcher_chain() -> tuple[int, int | None] | None:
    """(launch.py's pid, the ``deepspeed`` command's pid or None) when this process is a rank that
    DeepSpeed's launcher started; None otherwise (srun, mpirun, torchrun, plain python)."""
    launch = os.getppid()
    args = _cmdline(launch)
    if not any(a == _LAUNCH_MODULE or a.endswith("deepspeed/launcher/launch.py") for a in args):
        return None
    runner = _parent(launch)
    # Several nodes: launch.py's parent is pdsh's remote shell, not the runner; watch launch.py only.
    return launch, runner if runner is not None and _is_runner(_cmdline(runner)) else None


def watch_launcher(on_gone: Callable[[str], None], poll_s: float = 1.0) -> threading.Thread | None:
    """Call ``on_gone(what)`` once, from a daemon thread, when the launcher above this rank exits
    (launch.py, or the ``deepspeed`` command above it); None when no DeepSpeed launcher started us."""
    chain = launcher_chain()
    if chain is None:
        return None
    launch, runner = chain

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != launch:
                return on_gone(f"DeepSpeed's launch.py (pid {launch}) exited")
            if runner is not None and _parent(launch) != runner:  # launch.py was handed to another parent
                return on_gone(f"the deepspeed command (pid {runner}) exited")

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread
