"""Weight sync through a shared folder: write a Hugging Face safetensors folder, then
``/update_weights_from_disk`` on every server.

The folder is written under a temporary name and renamed when complete (rename is atomic on one
file system), so a server, a crash or a reader never sees a half-written folder.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from scope_ds.rollout.client import SyncRolloutClient
from scope_ds.rollout.weight_sync.common import VersionCounter, check_results, check_versions, update_session

# Files of a model folder that are not weights: copied so that the folder loads on its own.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_INDEX = "model.safetensors.index.json"


def _cpu_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A detached CPU tensor that owns its storage (safetensors refuses views and shared storage)."""
    t = tensor.detach().to("cpu")
    if not t.is_contiguous() or t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.nbytes:
        t = t.contiguous().clone()
    return t


def copy_model_files(config_dir: Path, dst: Path) -> None:
    """Copy a model folder's non-weight files (config, tokenizer, generation config) into ``dst``."""
    for src in config_dir.iterdir():
        if src.is_file() and src.name != _INDEX and not src.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(src, dst / src.name)


def write_hf_folder(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | Path,
    config_dir: str | Path | None = None,
    shard_bytes: int = 4 << 30,
) -> Path:
    """Write the tensors (streamed, one shard in memory at a time) as ``out_dir``, atomically.

    ``config_dir``'s non-weight files (config.json, tokenizer, ...) are copied alongside. Shards are
    named as ``save_pretrained`` names them, with an index when there is more than one.
    """
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        if config_dir is not None:
            copy_model_files(Path(config_dir), tmp)
        shards: list[dict[str, torch.Tensor]] = [{}]
        files: list[Path] = []
        size = 0
        total = 0
        for name, tensor in named_tensors:
            t = _cpu_tensor(tensor)
            if shards[-1] and size + t.nbytes > shard_bytes:
                files.append(tmp / f"part-{len(files)}.safetensors")
                save_file(shards[-1], str(files[-1]), metadata={"format": "pt"})
                shards[-1], size = {}, 0
            shards[-1][name] = t
            size += t.nbytes
            total += t.nbytes
        files.append(tmp / f"part-{len(files)}.safetensors")
        save_file(shards[-1], str(files[-1]), metadata={"format": "pt"})
        _name_shards(tmp, files, total)
        if out.exists():  # a folder of the same version from an interrupted run: replace it
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _name_shards(folder: Path, files: list[Path], total_bytes: int) -> None:
    if len(files) == 1:
        files[0].rename(folder / "model.safetensors")
        return
    weight_map = {}
    for i, path in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            weight_map.update(dict.fromkeys(f.keys(), final))
        path.rename(folder / final)
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / _INDEX).write_text(json.dumps(index, indent=2))


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
        self.versions = VersionCounter(client)

    def update(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Write, load on every server, check; returns the new policy version."""
        version = self.versions.next()
        # Written before the pause: generation goes on while the trainer serialises.
        folder = write_hf_folder(named_tensors, self.root / f"weights_v{version}", self.config_dir, self.shard_bytes)
        payload = {
            "model_path": str(folder.resolve()),
            "load_format": None,
            "flush_cache": True,
            "abort_all_requests": False,
            "weight_version": str(version),
        }
        with update_session(self.client, self.pause_mode):
            results = self.client.run(self.client.client.post_all("/update_weights_from_disk", payload))
            check_results(self.client.urls, results, "update_weights_from_disk")
            check_versions(self.client, version)
        self.versions.commit(version)
        self._prune()
        return version

    def _prune(self) -> None:
        suffixes = [p.name.removeprefix("weights_v") for p in self.root.glob("weights_v*")]
        folders = sorted(int(s) for s in suffixes if s.isdigit())
        for old in folders[: -self.keep]:
            shutil.rmtree(self.root / f"weights_v{old}", ignore_errors=True)
