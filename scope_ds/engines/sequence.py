"""Splitting a packed row along the sequence over a sequence-parallel group (issue 35, in progress).

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

from dataclasses import dataclass

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
