"""A Hugging Face model folder (safetensors shards plus the source's config and tokenizer), written
atomically: the one writer that checkpoints, the final export and the disk weight sync share.

The folder is written under a temporary name and renamed when complete (rename is atomic on one
file system), so a server, a crash or a reader never sees a half-written folder. Only torch,
safetensors and the standard library: no DeepSpeed, no HTTP.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Files of a model folder that are not weights: copied so that the folder loads on its own.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_INDEX = "model.safetensors.index.json"


def _cpu_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A detached CPU tensor that owns its storage (safetensors refuses views and shared storage)."""
    t = tensor.detach().to("cpu")
    if not t.is_contiguous() or t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.nbytes:
        t = t.contiguous().clone()
    return t


def copy_model_files(config_dir: Path, dst: Path, *, overwrite: bool = True) -> None:
    """Copy a model folder's non-weight files (config, tokenizer, generation config) into ``dst``.

    ``overwrite=False`` keeps the files already in ``dst`` (a config that save_pretrained wrote).
    """
    for src in config_dir.iterdir():
        if src.is_file() and src.name != _INDEX and not src.name.endswith(_WEIGHT_SUFFIXES):
            if overwrite or not (dst / src.name).exists():
                shutil.copy2(src, dst / src.name)


def _umask() -> int:
    # Read, not set-and-restore: os.umask(0) would briefly give other threads' new files mode 0666.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_permissions(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a new folder and file get here (0755 / 0644
    under the usual umask 022), whatever a temporary folder or a copied file had (0700 / 0600)."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


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
        ordinary_permissions(tmp)
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
