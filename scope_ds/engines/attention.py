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
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """[1, N, H, D] attention output; ``query`` [1, H, N, D], ``key`` / ``value`` [1, H_kv, N, D]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if cu_seq_lens_q is None and attention_mask is None and position_ids is not None and query.shape[0] == 1:
        # no bounds given, and _mask built no mask: a packed row's bounds from its position ids
        if position_ids.shape == (1, query.shape[2]) and int(position_ids[0, 0]) == 0:
            cu_seq_lens_q = sequence_bounds(position_ids)
    if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    bounds = cu_seq_lens_q.tolist() if isinstance(cu_seq_lens_q, torch.Tensor) else list(cu_seq_lens_q)
    if bounds[0] != 0 or bounds[-1] != query.shape[2]:
        raise ValueError(f"cu_seq_lens_q {bounds[:3]}...{bounds[-1]} does not cover the {query.shape[2]} packed tokens")
    gqa = query.shape[1] != key.shape[1]
    q_HND, k_HND, v_HND = query[0], key[0], value[0]

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)

    pieces = []  # [H, n, D] each, in the order of plan.order
    plan = _plan(tuple(bounds), query.device)
    for group in plan.groups:
        if isinstance(group, slice):  # one sequence
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


@dataclass(frozen=True)
class _Plan:
    """How one packed row's sequences are attended: ``groups`` (a sequence's slice of the row, or a
    padded batch: (index_BL into the row, the real positions of its flattened [B * L])), and the
    permutation from the groups' order back to the row's (None: already in order)."""

    groups: list[slice | tuple[torch.Tensor, torch.Tensor]]
    inverse: torch.Tensor | None


@functools.lru_cache(maxsize=4)  # the same bounds for every layer of a forward pass and its backward
def _plan(bounds: tuple[int, ...], device: torch.device) -> _Plan:
    spans = sorted(((a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a), key=lambda s: s[0] - s[1])
    runs: list[list[tuple[int, int]]] = []
    for a, b in spans:  # longest first: a group's first sequence is its longest
        run = runs[-1] if runs else None
        if run and (len(run) + 1) * (run[0][1] - run[0][0]) ** 2 <= PAD_WORK * sum(
            (y - x) ** 2 for x, y in [*run, (a, b)]
        ):
            run.append((a, b))
        else:
            runs.append([(a, b)])
    groups: list[slice | tuple[torch.Tensor, torch.Tensor]] = []
    order = []
    for run in runs:
        order += [i for a, b in run for i in range(a, b)]
        if len(run) == 1:
            groups.append(slice(*run[0]))
            continue
        t = run[0][1] - run[0][0]
        # padding reads its sequence's last token: any real key serves, is_causal keeps it unseen
        index_BL = torch.tensor([[a + min(j, b - a - 1) for j in range(t)] for a, b in run], dtype=torch.long)
        real = torch.tensor([r * t + j for r, (a, b) in enumerate(run) for j in range(b - a)], dtype=torch.long)
        groups.append((index_BL.to(device), real.to(device)))
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
