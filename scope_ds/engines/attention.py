"""Causal attention over a packed micro-batch, one sequence at a time.

A packed micro-batch is one row of N tokens holding several rollouts (position ids restart at 0 at
each). transformers' SDPA path attends over it with a dense [N, N] block-diagonal mask: N^2 work
whatever the rollouts' lengths, where the rollouts themselves need sum(L_i^2); on this CPU the toy
student's forward + backward took 1.7x the padded layout's (tools/bench_attention.py). Flash-attention's varlen kernels do
sum(L_i^2), but only on GPUs. This attention, registered with transformers' AttentionInterface,
runs SDPA with ``is_causal`` on each rollout's slice when the caller passes the sequences' bounds
(``cu_seq_lens_q``, the keyword transformers' varlen kernels read), and is plain SDPA otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NAME = "scope_ds_packed_sdpa"


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

    if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    bounds = cu_seq_lens_q.tolist() if isinstance(cu_seq_lens_q, torch.Tensor) else list(cu_seq_lens_q)
    if bounds[0] != 0 or bounds[-1] != query.shape[2]:
        raise ValueError(f"cu_seq_lens_q {bounds[:3]}...{bounds[-1]} does not cover the {query.shape[2]} packed tokens")
    gqa = query.shape[1] != key.shape[1]
    pieces = [
        F.scaled_dot_product_attention(
            query[:, :, a:b],
            key[:, :, a:b],
            value[:, :, a:b],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        if b > a
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def plain_causal(config: Any) -> bool:
    """Whether every layer of the model attends causally to all earlier tokens (no sliding window,
    which the per-sequence path would drop)."""
    window = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    layer_types = getattr(config, "layer_types", None) or []
    return not window and all(t == "full_attention" for t in layer_types)


def register() -> str:
    """Register the attention (and SDPA's mask builder under its name) with transformers; its name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def sequence_bounds(position_ids_1N: torch.Tensor) -> list[int]:
    """Where each packed sequence starts (position id 0), and N at the end."""
    starts = torch.nonzero(position_ids_1N[0] == 0).flatten().tolist()
    return [*starts, position_ids_1N.shape[1]]
