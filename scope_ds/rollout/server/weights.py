"""Weight updates on the embedded server's side: from a safetensors folder or a broadcast.

Every update checks all names and shapes before it copies anything, so a bad update leaves the
model as it was (SGLang answers success=false in that case too). Names are Hugging Face checkpoint
names; tied weights (lm_head = embed_tokens) are reachable under either name.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from scope_ds.rollout.weight_sync import group as pgroup


def param_table(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every loadable tensor by checkpoint name, tied aliases included."""
    table = dict(model.named_parameters(remove_duplicate=False))
    persistent = set(model.state_dict().keys())
    table.update({n: b for n, b in model.named_buffers(remove_duplicate=False) if n in persistent})
    return table


def _check(table: dict[str, torch.Tensor], name: str, shape: Iterable[int]) -> None:
    if name not in table:
        raise ValueError(f"unknown weight {name!r} (not a parameter of the served model)")
    if tuple(table[name].shape) != tuple(shape):
        raise ValueError(f"weight {name!r} has shape {list(shape)}, the model expects {list(table[name].shape)}")


def _copy_in(table: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], lock: threading.Lock) -> None:
    with lock, torch.no_grad():
        for name, tensor in tensors.items():
            table[name].copy_(tensor.to(table[name].dtype))


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder (sharded through an index or not)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    return files


def missing_weights(table: dict[str, torch.Tensor], names: set[str]) -> list[str]:
    """The model's tensors that ``names`` does not cover; tied aliases count once (either name covers)."""
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in table.items():
        by_tensor.setdefault(id(tensor), []).append(name)
    return sorted(aliases[0] for aliases in by_tensor.values() if not any(a in names for a in aliases))


def load_from_disk(
    model: torch.nn.Module, folder: str | Path, lock: threading.Lock, allow_partial: bool = False
) -> int:
    """Load every tensor of a safetensors folder into ``model``; returns how many were loaded.

    The folder must hold every weight of the model unless ``allow_partial``: a folder written for
    another model (or cut short) is refused by name instead of leaving a mix of old and new weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model_path {folder} is not a folder")
    table = param_table(model)
    files = safetensors_files(folder)
    names: set[str] = set()
    for path in files:  # validate everything first: a refused update must not half-apply
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                _check(table, name, f.get_slice(name).get_shape())
                names.add(name)
    missing = missing_weights(table, names)
    if missing and not allow_partial:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(
            f"{folder} lacks {len(missing)} of the model's weights: {shown}; "
            "send allow_partial=true to load only the ones it has"
        )
    count = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        _copy_in(table, tensors, lock)
        count += len(tensors)
    return count


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


class DistributedReceiver:
    """The server's end of the weight-update group: receives broadcasts from trainer rank 0."""

    def __init__(self) -> None:
        self.groups: dict[str, torch.distributed.ProcessGroup] = {}

    def init_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
        rendezvous_timeout_s: float = 60.0,
    ) -> str:
        """Join the group as rank ``rank_offset``; raises if the others have not joined within
        ``rendezvous_timeout_s`` (the caller validated the ranks)."""
        if group_name in self.groups:
            raise ValueError(f"group {group_name!r} already exists; destroy it first")
        # "nccl" is accepted (SGLang clients send it) but a CPU model can only receive with gloo.
        used = pgroup.EMBEDDED_BACKEND
        self.groups[group_name] = pgroup.init_custom_group(
            used,
            master_address,
            master_port,
            rank_offset,
            world_size,
            group_name,
            rendezvous_timeout_s=rendezvous_timeout_s,
        )
        return used

    def receive(
        self,
        model: torch.nn.Module,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str,
        lock: threading.Lock,
    ) -> None:
        """Receive one bucket in the announced order, then load it (all-or-nothing)."""
        if group_name not in self.groups:
            raise ValueError(f"no weight-update group {group_name!r}; call /init_weights_update_group first")
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError(f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})")
        group = self.groups[group_name]
        for shape in shapes:  # refuse a malformed bucket before the first broadcast, never in the middle
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"a shape must be a list of non-negative integers, got {shape!r}")
        for dtype in dtypes:
            _dtype(str(dtype))
        received = {}
        for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
            # Always take part in every broadcast, even for a name we will refuse: skipping one
            # would leave the trainer blocked in its collective.
            tensor = torch.empty(shape, dtype=_dtype(dtype))
            pgroup.broadcast(tensor, group, src=0)
            received[name] = tensor
        table = param_table(model)
        for name, tensor in received.items():
            _check(table, name, tensor.shape)
        _copy_in(table, received, lock)

    def destroy(self, group_name: str) -> None:
        group = self.groups.pop(group_name, None)
        if group is None:
            raise ValueError(f"no weight-update group {group_name!r}")
        pgroup.destroy_group(group)
