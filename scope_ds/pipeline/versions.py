"""The one owner of policy versions: which policy the student is at, which one each server holds.

Version v is the student after v optimizer steps from its initial weights (version 0), so the
batch of step s is trained by version s. The servers start with the initial weights (version 0)
and hold whatever version they were last synced to. The producer asks whether a batch may start,
weight sync asks what to push, checkpoints save ``student``, and metrics ask how far behind a
rollout's version is: nobody else does arithmetic on versions.
"""

from __future__ import annotations

from collections.abc import Sequence


class PolicyVersions:
    """The student's policy version and the version every rollout server holds."""

    def __init__(self, servers: Sequence[str] = (), student: int = 0) -> None:
        """``servers``: the rollout servers' URLs (rank 0; empty elsewhere); ``student``: the
        version the student starts at (a resumed run: the checkpoint's)."""
        self.student = student
        # Launched servers load the student's initial folder; a resumed run pushes its weights
        # before anything is generated (see loop.restore), which sets these.
        self._served = dict.fromkeys(servers, 0)

    def resume_at(self, student: int) -> None:
        """A resumed student is at the checkpoint's version (the servers get it at the next sync)."""
        self.student = student

    def stepped(self) -> None:
        """The student took an optimizer step: it is one version further."""
        self.student += 1

    def synced(self) -> None:
        """Every server now holds the student's current version."""
        self._served = dict.fromkeys(self._served, self.student)

    def served(self) -> dict[str, int]:
        """URL -> the version that server holds."""
        return dict(self._served)

    def oldest_served(self) -> int:
        return min(self._served.values(), default=self.student)

    def may_generate(self, step: int, max_staleness: int) -> bool:
        """Whether the batch of ``step`` may be generated now: every server holds a version at most
        ``max_staleness`` behind the one that will train it (0: the synchronous schedule)."""
        return self.oldest_served() >= step - max_staleness

    def behind(self, version: int) -> int:
        """How many versions the student is ahead of ``version`` (a rollout's staleness)."""
        return self.student - version
