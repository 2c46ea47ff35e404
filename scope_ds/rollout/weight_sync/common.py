"""What every weight-sync method shares: the pause / session bracket and the result checks.

Nothing here counts policy versions: the trainer owns the policy version. The caller names the
version; the method checks the servers report it (:func:`check_versions`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from scope_ds.rollout.client import SyncRolloutClient

log = logging.getLogger(__name__)


class WeightSync(Protocol):
    """A weight-sync method (disk.DiskWeightSync, distributed.DistributedWeightSync), chosen once
    when the run is built."""

    def update(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        version: int,
        staged: Callable[[], None] | None = None,
    ) -> None:
        """Push the full weights labelled ``version`` to every server and check that each reports
        exactly it (else WeightSyncError); ``staged()`` runs once they are ready to go."""

    def close(self) -> None:
        """Release what the method holds (a process group); the servers keep their weights."""


class WeightSyncError(RuntimeError):
    """A weight update that did not reach every server; the servers stay paused (see update_session)."""


@contextmanager
def update_session(client: SyncRolloutClient, pause_mode: str = "abort", session: bool = True) -> Iterator[None]:
    """Pause generation and, with ``session``, open SGLang's weight-update session around the body.

    "abort" ends the running requests at once (the client resubmits them, and they wait for the
    resume), so that no rollout mixes two policy versions. begin/end_weight_update exist only in
    SGLang >= 0.5.21, which requires them around the tensor and distributed updates (a 404 from an
    older server is skipped); an update from disk needs no session, so it saves the two round
    trips (``session=False``). If the body fails, the servers stay paused: resuming on
    half-updated weights would produce rollouts of no policy at all.
    """
    client.pause(pause_mode)
    if session:
        client.run(client.client.post_all("/begin_weight_update", {}, ok_404=True))
    try:
        yield
    except BaseException:
        try:
            if session:
                client.run(client.client.post_all("/end_weight_update", {}, ok_404=True))
        except Exception:  # a dead server must not hide the error that broke the update
            log.exception("end_weight_update after a failed update")
        log.error("weight update failed; rollout servers left paused until the next successful update")
        raise
    if session:
        client.run(client.client.post_all("/end_weight_update", {}, ok_404=True))
    client.resume()


def check_results(urls: list[str], results: list[Any], what: str) -> None:
    """Raise WeightSyncError unless every server answered ``success: true``."""
    bad = [(u, r) for u, r in zip(urls, results, strict=True) if not (isinstance(r, dict) and r.get("success"))]
    if bad:
        detail = "; ".join(f"{u}: {r}" for u, r in bad)
        raise WeightSyncError(f"{what} failed on {len(bad)} of {len(urls)} server(s): {detail}")


def check_versions(client: SyncRolloutClient, version: int) -> None:
    """Every server must now report exactly ``version``, the one the caller named (catches an update
    that silently did nothing); raises WeightSyncError naming the servers that do not."""
    versions = client.weight_versions()
    stale = {u: v for u, v in versions.items() if v != version}
    if stale:
        raise WeightSyncError(f"servers report weight_version {stale} after the update to {version}")
