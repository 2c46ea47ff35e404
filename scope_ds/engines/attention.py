"""Causal attention over a packed micro-batch, sequence by sequence.

A packed micro-batch is one row of N tokens holding several rollouts (position ids restart at 0 at
each). transformers' SDPA path attends over it with a dense [N, N] block-diagonal mask: N^2 work
whatever the rollouts' lengths, where the rollouts themselves need sum(L_i^2); on this CPU the toy
student's forward + backward took 1.7x the padded layout's (tools/bench_attention.py). Flash-attention's varlen kernels do
sum(L_i^2), but only on GPUs. This attention, registered with transformers' AttentionInterface,
runs SDPA with ``is_causal`` on each rollout's slice when the caller passes the sequences' bounds
(``cu_seq_lens_q``, the keyword transformers' varlen kernels read), and is plain SDPA otherwise.

Sequences of similar length go through one SDPA call together (``_plan``): gathered into a
right-padded batch, where ``is_causal`` alone keeps every real query off the padding (it lies after
the row's last real key), then gathered back; a call per sequence costs more than the attention of
a 50-token rollout. A group admits a sequence while its padded work stays within
``PAD_WORK`` x the work of its sequences alone, so ragged long sequences still go one by one.
The [N, N] mask transformers would build for a packed row is skipped (``_mask``): with the bounds
this attention reads none, and building it was a tenth of a toy step.

A prompt's n rollouts can share one copy of the prompt in the row (``train.share_prompts``,
batching.collate_packed): the first rollout is packed whole, the others as their responses alone,
their position ids going on from the prompt's length. ``layout_of`` reads that from the position
ids, and each such response attends to the prompt's keys, then causally to its own; the prompt's
tokens go through the model once instead of n times. Flash-attention's varlen kernels cannot
express it, so only this attention takes such a row (models._Engine refuses it elsewhere).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

NAME = "scope_ds_packed_sdpa"
PAD_WORK = 1.5  # a padded group's attention work (rows x longest^2) over its sequences' own (sum L^2), at most


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: list[int] | torch.Tensor | None = None,
    packed_layout: Layout | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """[1, N, H, D] attention output; ``query`` [1, H, N, D], ``key`` / ``value`` [1, H_kv, N, D].

    A packed row's sequences come from ``packed_layout`` (see ``layout_of``), else from the
    bounds ``cu_seq_lens_q`` (sequences without a shared prefix), else from the position ids."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n = query.shape[2]
    if packed_layout is None and cu_seq_lens_q is not None:
        bounds = cu_seq_lens_q.tolist() if isinstance(cu_seq_lens_q, torch.Tensor) else list(cu_seq_lens_q)
        if bounds[0] != 0 or bounds[-1] != n:
            raise ValueError(f"cu_seq_lens_q {bounds[:3]}...{bounds[-1]} does not cover the {n} packed tokens")
        packed_layout = tuple((a, b, a, 0) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a)
    position_ids = kwargs.get("position_ids")
    if packed_layout is None and attention_mask is None and position_ids is not None and query.shape[0] == 1:
        # no layout given, and _mask built no mask: a packed row's layout from its position ids
        if position_ids.shape == (1, n) and int(position_ids[0, 0]) == 0:
            packed_layout = layout_of(position_ids)
    if packed_layout is None or query.shape[0] != 1 or n != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if sum(b - a for a, b, _, _ in packed_layout) != n:
        raise ValueError(f"the packed layout covers {sum(b - a for a, b, _, _ in packed_layout)} of {n} tokens")
    gqa = query.shape[1] != key.shape[1]
    q_HND, k_HND, v_HND = query[0], key[0], value[0]

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)

    pieces = []  # [H, n, D] each, in the order of plan.order
    plan = _plan(packed_layout, query.device)
    for group in plan.groups:
        if isinstance(group, slice):  # one sequence without a prefix
            pieces.append(sdpa(q_HND[None, :, group], k_HND[None, :, group], v_HND[None, :, group])[0])
            continue
        index_BL, real = group
        b, t = index_BL.shape
        q, k, v = (
            x.index_select(1, index_BL.flatten()).unflatten(1, (b, t)).transpose(0, 1) for x in (q_HND, k_HND, v_HND)
        )
        out_BHLD = sdpa(q, k, v)  # [B, H, L, D]
        pieces.append(out_BHLD.transpose(0, 1).flatten(1, 2).index_select(1, real))
    out_HND = torch.cat(pieces, dim=1)
    if plan.inverse is not None:
        out_HND = out_HND.index_select(1, plan.inverse)
    return out_HND.transpose(0, 1)[None].contiguous(), None


# A packed row's sequences: (start, end, prefix start, prefix length) each, in row order. Tokens
# start:end attend to the prefix's tokens (prefix start : prefix start + prefix length, earlier in
# the row), then causally to themselves; a sequence without a shared prefix has prefix length 0.
Layout = tuple[tuple[int, int, int, int], ...]


def layout_of(position_ids_1N: torch.Tensor) -> Layout:
    """A packed row's layout from its position ids. A sequence starts where the position ids do
    not go on by one. One that starts at position 0 stands alone; one that starts at p > 0
    continues the first p tokens of the latest sequence that started at 0 (a prompt packed once
    and shared by the responses after it: batching.collate_packed with ``share_prompts``)."""
    row = position_ids_1N[0]
    jumps = torch.nonzero(row[1:] != row[:-1] + 1).flatten() + 1
    starts = [0, *jumps.tolist()] if row.numel() else []
    pos = row[starts].tolist() if starts else []
    out: list[tuple[int, int, int, int]] = []
    root = None  # (start, end) of the latest sequence that started at position 0
    for a, b, p in zip(starts, [*starts[1:], row.numel()], pos, strict=True):
        if p == 0:
            root = (a, b)
            out.append((a, b, a, 0))
            continue
        if root is None or root[1] - root[0] < p:
            raise ValueError(
                f"packed tokens {a}:{b} start at position {p} but no sequence of at least {p} tokens "
                "starting at position 0 comes before them to continue"
            )
        out.append((a, b, root[0], p))
    return tuple(out)


@dataclass(frozen=True)
class _Plan:
    """How one packed row's sequences are attended: ``groups`` (a sequence's slice of the row, or a
    padded batch: (index_BL into the row, the real positions of its flattened [B * L])), and the
    permutation from the groups' order back to the row's (None: already in order)."""

    groups: list[slice | tuple[torch.Tensor, torch.Tensor]]
    inverse: torch.Tensor | None


@functools.lru_cache(maxsize=4)  # the same layout for every layer of a forward pass and its backward
def _plan(layout: Layout, device: torch.device) -> _Plan:
    """Each sequence is attended as its view: its prefix's tokens, then its own, under ``is_causal``
    (the prefix's queries are computed again and their outputs dropped: p^2 attention work, no
    mask). Views of similar length share one padded call."""
    views = sorted(layout, key=lambda s: -(s[3] + s[1] - s[0]))  # longest first: a group's first is its longest
    size = {s: s[3] + s[1] - s[0] for s in layout}
    runs: list[list[tuple[int, int, int, int]]] = []
    for s in views:
        run = runs[-1] if runs else None
        if run and (len(run) + 1) * size[run[0]] ** 2 <= PAD_WORK * sum(size[x] ** 2 for x in [*run, s]):
            run.append(s)
        else:
            runs.append([s])
    groups: list[slice | tuple[torch.Tensor, torch.Tensor]] = []
    order = []
    for run in runs:
        order += [i for a, b, _, _ in run for i in range(a, b)]
        if len(run) == 1 and run[0][3] == 0:
            groups.append(slice(run[0][0], run[0][1]))
            continue
        t = size[run[0]]
        index, real = [], []
        for r, (a, b, c, p) in enumerate(run):
            view = [*range(c, c + p), *range(a, b)]
            # padding reads the view's last token: any real key serves, is_causal keeps it unseen
            index.append(view + [view[-1]] * (t - len(view)))
            real += [r * t + j for j in range(p, len(view))]
        groups.append(
            (torch.tensor(index, dtype=torch.long).to(device), torch.tensor(real, dtype=torch.long).to(device))
        )
    inverse = None
    if order != list(range(len(order))):
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        inverse = inverse.to(device)
    return _Plan(groups, inverse)


def _mask(*args: Any, attention_mask: torch.Tensor | None = None, batch_size: int = 1, **kwargs: Any) -> Any:
    """SDPA's mask, except none for a single row without a padding mask: a packed row (whose
    bounds this attention reads instead) or one sequence (causal without a mask)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and batch_size == 1:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, batch_size=batch_size, **kwargs)


def plain_causal(config: Any) -> bool:
    """Whether every layer of the model attends causally to all earlier tokens (no sliding window,
    which the per-sequence path would drop)."""
    window = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    layer_types = getattr(config, "layer_types", None) or []
    return not window and all(t == "full_attention" for t in layer_types)


def register() -> str:
    """Register the attention (and its mask builder, ``_mask``) with transformers; its name."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME


def sequence_bounds(position_ids_1N: torch.Tensor) -> list[int]:
    """Where each packed sequence starts (position id 0), and N at the end."""
    starts = torch.nonzero(position_ids_1N[0] == 0).flatten().tolist()
    return [*starts, position_ids_1N.shape[1]]
