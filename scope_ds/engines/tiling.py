"""DeepSpeed's TiledMLP around a model's MLPs (``parallel.tiled_mlp``), for the longest rows.

A decoder layer's MLP holds its [N, intermediate] activations (two of them for a gated MLP) for the
backward: at 32k tokens and intermediate 6144 (Qwen3-1.7B) that is 0.75 GiB per layer in float32.
TiledMLP runs the MLP on shards of the sequence, keeps only its input, and recomputes each shard
in the backward, so a layer's MLP holds one shard's activations at a time (a second forward of the
MLP is the price).

Under ZeRO-3 every call of the MLP's linear layers gathers their weights over the engine's ranks,
a collective: every rank must run as many shards. Their number is ceil(N / hidden size) (as
DeepSpeed suggests), the largest over those ranks (one all-reduce of a number per layer and pass;
none for weights kept whole, ZeRO stages 0-2),
and the row is padded with zeros to a multiple of it, so that each rank's sequence splits into
exactly that many shards. A zero row's MLP output is zero in the models we train (no biases); it
is cut off again, and its gradient is zero.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def tile_mlps(model: torch.nn.Module, path: str) -> int:
    """Wrap every decoder layer's ``mlp`` module of ``model`` in DeepSpeed's TiledMLP (its own
    ``forward``, so the tree, state dict and ZeRO-3 hooks stay as they are). Returns their number;
    ValueError naming the model where it has none."""
    hidden = int(model.config.get_text_config().hidden_size)
    mlps = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "mlp"]
    if not mlps:
        raise ValueError(f"{path}: no decoder layer has an 'mlp' module to tile; set parallel.tiled_mlp=false")
    for mlp in mlps:
        mlp.forward = _tiled(mlp, mlp.forward, hidden)
    return len(mlps)


def _tiled(mlp: torch.nn.Module, plain: Any, hidden: int) -> Any:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    params = list(mlp.parameters())

    def forward(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-2]
        shards = agreed(math.ceil(n / hidden), params)
        extra = -(-n // shards) * shards - n
        padded = torch.nn.functional.pad(x, (0, 0, 0, extra)) if extra else x
        out = TiledMLP.apply(lambda _module, shard: plain(shard), mlp, padded, shards, params)
        return out[..., :n, :] if extra else out

    return forward


def agreed(shards: int, params: list[torch.nn.Parameter]) -> int:
    """The largest ``shards`` (at least 1) over the ranks that gather ``params`` (their ZeRO-3
    group; a collective there). Parameters ZeRO-3 does not partition are gathered by nobody: each
    rank keeps its own count, and no collective runs (a whole teacher scoring in its own thread
    must not touch the default group)."""
    import torch.distributed as dist

    group = getattr(params[0], "ds_process_group", None) if params else None
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return max(1, shards)
    from deepspeed.accelerator import get_accelerator

    value = torch.tensor([max(1, shards)], dtype=torch.long, device=get_accelerator().current_device_name())
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return int(value.item())
