"""Splitting a packed row along the sequence over a sequence-parallel group (DeepSpeed Ulysses).

Under sequence parallelism (DeepSpeed Ulysses) the sp ranks of a group run the same packed
micro-batch, each holding one contiguous 1/sp of its row: those tokens, their position ids (a
rollout's own positions, so that a rollout may straddle two slices), and the response tokens whose
next-token distribution lies in the slice. This module holds the index arithmetic of that split,
which needs no process group: every rank of a group computes every rank's slice alike.

The row is first padded to a multiple of sp with pad tokens forming a sequence of their own
(positions 0, 1, ...), which no response token reads. A slice's response tokens are a contiguous
range of the row's M response tokens when their scoring positions increase with m, which holds for
every row collate_packed makes without ``share_prompts`` (a rollout that shares its prompt is
scored first at that prompt's last position, earlier in the row); such a row is refused.

Shape legend: N = positions of the packed row, M = its response tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class RowShard:
    """One rank's slice of a packed row split over ``len(counts)`` ranks."""

    start: int  # first position of the slice in the padded row
    stop: int  # one past its last
    padded: int  # the row's length padded to a multiple of the group's size
    m_start: int  # the slice's response tokens are m in [m_start, m_stop)
    m_stop: int
    counts: tuple[int, ...]  # response tokens of each rank's slice, in group order (what a gather receives)


def shard_row(score_pos_M: torch.Tensor, n_positions: int, size: int, rank: int) -> RowShard:
    """Rank ``rank``'s slice of a packed row of ``n_positions`` positions whose response token m is
    scored at position ``score_pos_M[m]``, split over ``size`` ranks (ValueError for a row whose
    scoring positions do not increase with m: a row with shared prompts)."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} of a sequence-parallel group of {size}")
    pos = score_pos_M.tolist()
    if any(b <= a for a, b in zip(pos, pos[1:], strict=False)):
        raise ValueError(
            "a packed row whose rollouts share their prompt cannot be split along the sequence: set "
            "train.share_prompts=false with parallel.sequence_parallel_size > 1"
        )
    if pos and not 0 <= pos[0] <= pos[-1] < n_positions:
        raise ValueError(f"scoring positions {pos[0]}..{pos[-1]} lie outside the row's {n_positions} positions")
    per = -(-n_positions // size)  # ceil: every rank's slice is as long
    bounds = [torch.searchsorted(score_pos_M, r * per).item() if pos else 0 for r in range(size + 1)]
    bounds[-1] = len(pos)
    counts = tuple(int(b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    return RowShard(rank * per, (rank + 1) * per, per * size, int(bounds[rank]), int(bounds[rank + 1]), counts)


def pad_row(
    ids_1N: torch.Tensor, positions_1N: torch.Tensor, padded: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, position ids) of a packed row padded to ``padded`` positions: pad tokens as a
    sequence of their own, its positions 0, 1, ..., which attends to nothing before it."""
    extra = padded - ids_1N.shape[1]
    if extra < 0:
        raise ValueError(f"a row of {ids_1N.shape[1]} positions cannot be padded to {padded}")
    if extra == 0:
        return ids_1N, positions_1N
    pad_ids = torch.full((1, extra), pad_id, dtype=ids_1N.dtype, device=ids_1N.device)
    pad_pos = torch.arange(extra, dtype=positions_1N.dtype, device=positions_1N.device)[None]
    return torch.cat([ids_1N, pad_ids], 1), torch.cat([positions_1N, pad_pos], 1)


@dataclass(frozen=True)
class SequenceGroup:
    """This rank's sequence-parallel group: ``size`` consecutive ranks, this one ``rank`` among them."""

    group: Any  # the process group (one per engine: the teacher may score beside the update)
    size: int
    rank: int

    def shard(self, score_pos_M: torch.Tensor, n_positions: int) -> RowShard:
        return shard_row(score_pos_M, n_positions, self.size, self.rank)

    def gather(self, local_CK: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
        """[sum(counts), K]: every rank's ``local_CK`` (its first ``counts[rank]`` rows) one after
        another in group order, on every rank of the group (a collective; no gradient)."""
        import torch.distributed as dist

        width = max(max(counts), 1)
        buf = local_CK.new_zeros((width, *local_CK.shape[1:]))
        buf[: counts[self.rank]] = local_CK[: counts[self.rank]].detach()
        parts = [torch.empty_like(buf) for _ in range(self.size)]
        dist.all_gather(parts, buf, group=self.group)
        return torch.cat([part[:c] for part, c in zip(parts, counts, strict=True)])


def consecutive_group(size: int) -> tuple[Any, int]:
    """(this rank's process group of ``size`` consecutive ranks, its rank there). A collective:
    every rank creates every group, in the same order (the sequence- and tensor-parallel groups)."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise ValueError(f"groups of {size} consecutive ranks do not divide the world size {world}")
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return mine, rank % size


def new_groups(size: int) -> SequenceGroup | None:
    """This rank's group of ``size`` consecutive ranks (None for size 1). A collective."""
    if size == 1:
        return None
    group, rank = consecutive_group(size)
    return SequenceGroup(group, size, rank)


def check_heads(config: Any, size: int, path: str) -> None:
    """Refuse a model whose heads Ulysses cannot split over ``size`` ranks, naming the numbers."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    if heads % size:
        raise ValueError(
            f"{path}: its {heads} attention heads do not split over parallel.sequence_parallel_size={size}; "
            "pick a size that divides them"
        )
    if kv % size and size % kv:
        raise ValueError(
            f"{path}: its {kv} key-value heads neither split over nor divide parallel.sequence_parallel_size="
            f"{size}; pick a size that divides them or that they divide"
        )


def register_ulysses(config: Any, core: str, sp: SequenceGroup, tag: str) -> str:
    """An attention for transformers, under a name of its own (one per engine: models' heads
    differ), that runs DeepSpeed's UlyssesSPAttentionHF around the registered attention ``core``:
    an all-to-all gives each rank the whole row for its share of the heads, ``core`` attends, a
    second all-to-all gives back the rank's slice of the sequence. Its name, for
    ``attn_implementation``. The mask transformers builds is for the slice alone: dropped, the
    core attention reads the row's layout from its position ids or ``packed_layout``."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    text = config.get_text_config()
    heads = text.num_attention_heads
    ulysses = UlyssesSPAttentionHF(
        attn=ALL_ATTENTION_FUNCTIONS[core],
        batch_size=1,  # a packed micro-batch is one row
        attn_head_count=heads,
        attn_head_size=getattr(text, "head_dim", None) or text.hidden_size // heads,
        kv_head_count=getattr(text, "num_key_value_heads", None) or heads,
        num_hidden_layers=text.num_hidden_layers,
        process_group=sp.group,
        seq_length_is_variable=True,
    )
    ulysses.core_attn_implementation = core

    def attend(module: torch.nn.Module, query, key, value, attention_mask, *args: Any, **kwargs: Any):
        return ulysses(module, query, key, value, None, *args, **kwargs)

    name = f"{core}_ulysses{sp.size}_{tag}"
    AttentionInterface.register(name, attend)
    AttentionMaskInterface.register(name, lambda *args, **kwargs: None)
    return name


def slice_grad_fn(grad_fn: Callable | None, m_start: int, real: bool) -> Callable | None:
    """A per-token loss's gradient function (ops.chunked_stats' ``grad_fn``, over the row's M
    response tokens) for one slice's tokens, which start at ``m_start``; a slice without response
    tokens (``real`` false: a stand-in position that the LM head still runs) takes no gradient."""
    if grad_fn is None:
        return None
    if not real:
        return lambda rows, values: {}
    return lambda rows, values: grad_fn(slice(rows.start + m_start, rows.stop + m_start), values)
