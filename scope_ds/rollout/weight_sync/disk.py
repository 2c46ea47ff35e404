"""Weight sync through a shared folder: write a Hugging Face safetensors folder, then
``/update_weights_from_disk`` on every server.

The folder is written atomically (see :mod:`scope_ds.hf_folder`), so a server never loads a
half-written one.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from scope_ds.hf_folder import write_hf_folder
from scope_ds.rollout.client import SyncRolloutClient
from scope_ds.rollout.weight_sync.common import check_results, check_versions, update_session


class DiskWeightSync:
    """Push full weights to every server through a folder on a path all of them can read."""

    def __init__(
        self,
        client: SyncRolloutClient,
        root: str | Path,
        *,
        config_dir: str | Path | None = None,
        keep: int = 2,
        pause_mode: str = "abort",
        shard_bytes: int = 4 << 30,
    ) -> None:
        """``root``: shared folder for ``weights_v{N}``; ``keep``: newest folders kept (>= 1)."""
        self.client = client
        self.root = Path(root)
        self.config_dir = config_dir
        self.keep = max(1, keep)
        self.pause_mode = pause_mode
        self.shard_bytes = shard_bytes

    def update(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        version: int,
        staged: Callable[[], None] | None = None,
    ) -> None:
        """Write the weights as ``weights_v{version}``, load them on every server labelled ``version``,
        and check that every server reports exactly ``version`` (else WeightSyncError).
        ``staged()``, if given, runs once the folder is written, before the servers are paused."""
        # Written before the pause: generation goes on while the trainer serialises.
        folder = write_hf_folder(named_tensors, self.root / f"weights_v{version}", self.config_dir, self.shard_bytes)
        if staged is not None:
            staged()
        payload = {
            "model_path": str(folder.resolve()),
            "load_format": None,
            "flush_cache": True,
            "abort_all_requests": False,
            "weight_version": str(version),
        }
        with update_session(self.client, self.pause_mode, session=False):  # SGLang: none needed from disk
            results = self.client.run(self.client.client.post_all("/update_weights_from_disk", payload))
            check_results(self.client.urls, results, "update_weights_from_disk")
            check_versions(self.client, version)
        self._prune()

    def close(self) -> None:
        """Nothing to release: the folders stay for the servers (and the newest ``keep`` for a resume)."""

    def _prune(self) -> None:
        suffixes = [p.name.removeprefix("weights_v") for p in self.root.glob("weights_v*")]
        folders = sorted(int(s) for s in suffixes if s.isdigit())
        for old in folders[: -self.keep]:
            shutil.rmtree(self.root / f"weights_v{old}", ignore_errors=True)
