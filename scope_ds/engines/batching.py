"""Rollouts to model inputs, and the split of a global batch into micro-batches on every rank.

Two layouts of a micro-batch:
- padded (``TokenInputs``, ``collate``): B rows, each one rollout right-padded to the longest;
- packed (``PackedInputs``, ``collate_packed``): the rollouts one after another in one row, no
  padding, position ids restarting at each rollout (the Hugging Face models confine attention to
  each sequence from them).

Shape legend: B = rollouts in a micro-batch, L = prompt + response positions (right-padded),
T = response positions (right-padded), N = positions of a packed row, M = the response tokens of a
packed row (the positions whose next-token distribution the losses need). Position p predicts
token p + 1, so the response token at position ``plen + t`` is scored at ``plen + t - 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from scope_ds.records import Rollout


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


@dataclass
class PackedInputs:
    """One micro-batch packed into a single row, padding-free."""

    input_ids_1N: torch.Tensor  # the rollouts' prompt + response tokens, one after another
    position_ids_1N: torch.Tensor  # 0, 1, ... within each rollout
    score_pos_M: torch.Tensor  # position in N whose next-token distribution scores response token m
    targets_M: torch.Tensor  # response token m
    resp_index_BT: torch.Tensor  # which m is response token t of rollout b (0 at padding)
    mask_BT: torch.Tensor  # real response tokens
    old_logp_BT: torch.Tensor  # behaviour log-probs from the rollout server (0 at padding)
    rows: list[int]  # index of each rollout in the caller's list (-1 for a dummy)
    shared_prompts: bool = False  # some rollouts continue an earlier one's prompt (collate_packed)

    @property
    def size(self) -> int:
        return self.mask_BT.shape[0]

    def to(self, device: torch.device | str) -> PackedInputs:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return PackedInputs(**moved)


def _sequences(rollouts: Sequence[Rollout | None], pad_id: int) -> tuple[list[list[int]], list[int], list[int]]:
    """(prompt + response tokens, prompt lengths, response lengths); None = a dummy: one pad token,
    no response.

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
    return seqs, plens, rlens


def _behaviour_BT(rollouts: Sequence[Rollout | None], rlens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask_BT, behaviour log-probs [B, T]) of the rollouts, right-padded."""
    b, t_max = len(rlens), max(max(rlens), 1)
    mask = torch.zeros((b, t_max), dtype=torch.bool)
    old = torch.zeros((b, t_max), dtype=torch.float32)
    for i, rlen in enumerate(rlens):
        if rlen:
            mask[i, :rlen] = True
            old[i, :rlen] = torch.tensor(rollouts[i].behaviour_logprobs, dtype=torch.float32)
    return mask, old


def collate_packed(
    rollouts: Sequence[Rollout | None], rows: Sequence[int], pad_id: int, share_prompts: bool = False
) -> PackedInputs:
    """Pack rollouts (None = a dummy) into one row; see PackedInputs. A micro-batch without any
    response token still scores one position (masked out), so that the LM head runs, as it must
    on every rank under ZeRO-3.

    ``share_prompts``: a rollout with the same prompt as the one packed whole before it (the
    rollouts of one prompt, adjacent) is packed as its response alone, its position ids going on
    from the prompt's length; its first token is scored at the shared prompt's last position
    (engines/attention.py attends it to the prompt's tokens)."""
    seqs, plens, rlens = _sequences(rollouts, pad_id)
    ids: list[int] = []
    positions: list[int] = []
    score_pos, targets = [], []
    index = torch.zeros((len(seqs), max(max(rlens), 1)), dtype=torch.long)
    root: tuple[int, tuple[int, ...]] | None = None  # (offset, prompt) of the latest rollout packed whole
    shared = False
    for i, (s, plen, rlen) in enumerate(zip(seqs, plens, rlens, strict=True)):
        prompt = tuple(rollouts[i].prompt_ids) if rollouts[i] is not None else None
        index[i, :rlen] = torch.arange(len(score_pos), len(score_pos) + rlen)
        offset = len(ids)
        if share_prompts and prompt is not None and root is not None and root[1] == prompt:
            shared = True
            ids.extend(s[plen:])
            positions.extend(range(plen, plen + rlen))
            score_pos.extend([root[0] + plen - 1, *range(offset, offset + rlen - 1)][:rlen])
        else:
            root = (offset, prompt) if prompt is not None else None
            ids.extend(s)
            positions.extend(range(len(s)))
            score_pos.extend(range(offset + plen - 1, offset + plen - 1 + rlen))
        targets.extend(s[plen:])
    if not score_pos:
        score_pos, targets = [0], [pad_id]
    mask, old = _behaviour_BT(rollouts, rlens)
    return PackedInputs(
        input_ids_1N=torch.tensor([ids], dtype=torch.long),
        position_ids_1N=torch.tensor([positions], dtype=torch.long),
        score_pos_M=torch.tensor(score_pos, dtype=torch.long),
        targets_M=torch.tensor(targets, dtype=torch.long),
        resp_index_BT=index,
        mask_BT=mask,
        old_logp_BT=old,
        rows=list(rows),
        shared_prompts=shared,
    )


def collate(rollouts: Sequence[Rollout | None], rows: Sequence[int], pad_id: int) -> TokenInputs:
    """Rollouts (None = a dummy row: one pad token, no response) as padded tensors."""
    seqs, plens, rlens = _sequences(rollouts, pad_id)
    b, l_max, t_max = len(seqs), max(len(s) for s in seqs), max(max(rlens), 1)
    ids = torch.full((b, l_max), pad_id, dtype=torch.long)
    attn = torch.zeros((b, l_max), dtype=torch.long)
    targets = torch.zeros((b, l_max), dtype=torch.long)
    index = torch.zeros((b, t_max), dtype=torch.long)
    for i, (s, plen, rlen) in enumerate(zip(seqs, plens, rlens, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        targets[i, : len(s) - 1] = torch.tensor(s[1:], dtype=torch.long)
        index[i, :rlen] = torch.arange(plen - 1, plen - 1 + rlen)
    mask, old = _behaviour_BT(rollouts, rlens)
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


def unpack_response(values_M: torch.Tensor, inputs: PackedInputs) -> torch.Tensor:
    """A packed row's per-response-token values [M] -> [B, T] by rollout (0 at padding)."""
    out = values_M[inputs.resp_index_BT]
    return torch.where(inputs.mask_BT, out, torch.zeros_like(out))


def balance_by_tokens(lengths: Sequence[int], world: int) -> list[list[int]]:
    """Each rank's indices of a global batch, balanced by tokens: longest first, each to the rank
    with the fewest tokens so far (the lowest rank on a tie). Every rank computes the same split.
    The ranks' totals end within the longest length of each other (the rank that got the last
    item of the fullest one was the emptiest then)."""
    loads, shares = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += lengths[i]
    return [sorted(s) for s in shares]


def pack_by_tokens(indices: Sequence[int], lengths: Sequence[int], budget: int, what: str) -> list[list[int]]:
    """``indices`` into micro-batches of at most ``budget`` tokens (first fit, longest first).
    A sequence longer than the budget is refused, naming both numbers and ``what`` sizes it."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        if lengths[i] > budget:
            raise ValueError(
                f"a rollout of {lengths[i]} tokens (prompt + response) does not fit {what}={budget}: "
                f"raise it to at least {lengths[i]} (or lower rollout.max_new_tokens)"
            )
        k = next((k for k, r in enumerate(room) if r >= lengths[i]), None)
        if k is None:
            bins.append([])
            room.append(budget)
            k = len(bins) - 1
        bins[k].append(i)
        room[k] -= lengths[i]
    return [sorted(b) for b in bins]


def share_units(
    lengths: Sequence[int], prompts: Sequence[Sequence[int]], max_tokens: int
) -> tuple[list[list[int]], list[int]]:
    """The sequences (prompt + response ``lengths``, ``prompts`` their prompts' tokens) as units
    that share their prompt in a packed row (collate_packed's ``share_prompts``): the sequences of
    one prompt, in order, split where a unit would pass ``max_tokens``. Returns (units as lists of
    indices, each unit's tokens: its prompt once, then every response)."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(tuple(p), []).append(i)
    units, sizes = [], []
    for prompt, members in by_prompt.items():
        unit, size = [], 0
        for i in members:
            extra = lengths[i] - len(prompt)  # the response, once the prompt is in the unit
            if unit and size + extra > max_tokens:
                units.append(unit)
                sizes.append(size)
                unit, size = [], 0
            unit.append(i)
            size += extra if len(unit) > 1 else lengths[i]
        units.append(unit)
        sizes.append(size)
    return units, sizes


def plan_micro_batches(
    lengths: Sequence[int],
    rank: int,
    world: int,
    *,
    max_tokens: int = 0,
    size: int = 0,
    what: str = "",
    prompts: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """This rank's micro-batches of a global batch of sequences of ``lengths``, as lists of indices,
    the same number on every rank (empty lists pad the shorter ranks: ZeRO-3 forwards are
    collectives). Packed (``max_tokens`` > 0): balanced over ranks by tokens and packed into
    micro-batches of at most ``max_tokens`` (``what`` names the setting in errors); with
    ``prompts`` (each sequence's prompt tokens) the sequences of one prompt are kept together and
    counted with their prompt once (share_units), for collate_packed's ``share_prompts``. Padded:
    a contiguous share per rank, ``size`` sequences per micro-batch."""
    if max_tokens:
        units, sizes = ([[i] for i in range(len(lengths))], list(lengths))
        if prompts is not None:
            units, sizes = share_units(lengths, prompts, max_tokens)
        packs = [pack_by_tokens(s, sizes, max_tokens, what) for s in balance_by_tokens(sizes, world)]
        count = max(1, max(len(p) for p in packs))
        mine = [[i for u in mb for i in units[u]] for mb in packs[rank]]
        return mine + [[] for _ in range(count - len(mine))]
    count = max(1, math.ceil(math.ceil(len(lengths) / world) / size))
    return micro_batches(rank_share(len(lengths), rank, world), size, count)
