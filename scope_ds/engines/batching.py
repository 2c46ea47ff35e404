"""Rollouts to padded tensors, and the per-rank split of a global batch.

Shape legend: B = rollouts in a micro-batch, L = prompt + response positions (right-padded),
T = response positions (right-padded). Position p of the logits predicts token p + 1, so the
response token at position ``plen + t`` is scored by the logits at ``plen + t - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from scope_ds.sample import Rollout


@dataclass
class TokenInputs:
    """One micro-batch, ready for a causal LM forward."""

    input_ids_BL: torch.Tensor  # prompt + response, right-padded with pad_id
    attention_mask_BL: torch.Tensor  # 1 on real tokens
    targets_BL: torch.Tensor  # token at position p + 1 (what logits at p predict); 0 where none
    resp_index_BT: torch.Tensor  # position p (in L) whose logits score response token t
    mask_BT: torch.Tensor  # real response tokens
    old_logp_BT: torch.Tensor  # behaviour log-probs from the rollout server (0 at padding)
    rows: list[int]  # index of each row in the caller's list of rollouts (-1 for a dummy row)

    @property
    def size(self) -> int:
        return self.input_ids_BL.shape[0]

    def to(self, device: torch.device | str) -> TokenInputs:
        """The same micro-batch with every tensor on ``device`` (the engine's)."""
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return TokenInputs(**moved)


def collate(rollouts: Sequence[Rollout | None], rows: Sequence[int], pad_id: int) -> TokenInputs:
    """Pack rollouts (None = a dummy row: one pad token, no response) into padded tensors.

    Every rollout's behaviour log-probs have one entry per response token (raises ValueError naming
    the rollout otherwise): a short or missing list would silently read as pi_old = 1 (log 0).
    """
    seqs, plens, rlens = [], [], []
    for r in rollouts:
        if r is None:
            seqs.append([pad_id])
            plens.append(1)
            rlens.append(0)
        else:
            if len(r.behaviour_logprobs) != len(r.response_ids):
                raise ValueError(
                    f"rollout prompt_id={r.prompt_id!r} group_id={r.group_id!r} sample_index={r.sample_index} "
                    f"request_id={r.request_id!r} has {len(r.behaviour_logprobs)} behaviour log-probs for "
                    f"{len(r.response_ids)} response tokens"
                )
            seqs.append(list(r.prompt_ids) + list(r.response_ids))
            plens.append(len(r.prompt_ids))
            rlens.append(len(r.response_ids))
    b, l_max, t_max = len(seqs), max(len(s) for s in seqs), max(max(rlens), 1)
    ids = torch.full((b, l_max), pad_id, dtype=torch.long)
    attn = torch.zeros((b, l_max), dtype=torch.long)
    targets = torch.zeros((b, l_max), dtype=torch.long)
    index = torch.zeros((b, t_max), dtype=torch.long)
    mask = torch.zeros((b, t_max), dtype=torch.bool)
    old = torch.zeros((b, t_max), dtype=torch.float32)
    for i, (s, plen, rlen) in enumerate(zip(seqs, plens, rlens, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        targets[i, : len(s) - 1] = torch.tensor(s[1:], dtype=torch.long)
        if rlen:
            index[i, :rlen] = torch.arange(plen - 1, plen - 1 + rlen)
            mask[i, :rlen] = True
            old[i, :rlen] = torch.tensor(rollouts[i].behaviour_logprobs, dtype=torch.float32)
    return TokenInputs(ids, attn, targets, index, mask, old, list(rows))


def rank_share(n: int, rank: int, world: int) -> list[int]:
    """Indices of a global batch of ``n`` items that ``rank`` handles: contiguous, sizes differ by <= 1."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (1 if rank < extra else 0)))


def micro_batches(indices: Sequence[int], size: int, count: int) -> list[list[int]]:
    """Split ``indices`` into exactly ``count`` micro-batches of at most ``size`` (padding with empty
    lists), so that every rank runs the same number of forward passes under ZeRO-3."""
    chunks = [list(indices[i : i + size]) for i in range(0, len(indices), size)]
    if len(chunks) > count:
        raise ValueError(f"{len(indices)} rollouts do not fit in {count} micro-batches of {size}")
    return chunks + [[] for _ in range(count - len(chunks))]


def gather_response(values_BL: torch.Tensor, inputs: TokenInputs) -> torch.Tensor:
    """Per-position values [B, L] -> per-response-token values [B, T] (0 at padding)."""
    out = values_BL.gather(1, inputs.resp_index_BT)
    return torch.where(inputs.mask_BT, out, torch.zeros_like(out))
