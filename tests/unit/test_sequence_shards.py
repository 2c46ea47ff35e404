"""The split of a packed row over a sequence-parallel group (engines/sequence.py), against a plain
reference that assigns each response token to the slice holding its scoring position."""

from __future__ import annotations

import random

import pytest
import torch

from scope_ds.engines.batching import collate_packed
from scope_ds.engines.sequence import pad_row, shard_row
from scope_ds.records import Rollout


def _rollout(rng: random.Random, i: int, prompt: list[int] | None = None) -> Rollout:
    prompt = prompt or [rng.randrange(3, 50) for _ in range(rng.randrange(1, 9))]
    response = [rng.randrange(3, 50) for _ in range(rng.randrange(1, 30))]
    return Rollout(
        prompt_id=f"p{i}", group_id=f"g{i}", sample_index=0, prompt_ids=prompt, response_ids=response,
        behaviour_logprobs=[-1.0] * len(response),
    )  # fmt: skip


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", range(6))
def test_every_response_token_lies_in_exactly_one_slice(size: int, seed: int) -> None:
    rng = random.Random(seed)
    rollouts = [_rollout(rng, i) for i in range(rng.randrange(1, 6))]
    inputs = collate_packed(rollouts, list(range(len(rollouts))), pad_id=0)
    n, pos = inputs.input_ids_1N.shape[1], inputs.score_pos_M.tolist()
    shards = [shard_row(inputs.score_pos_M, n, size, r) for r in range(size)]
    per = -(-n // size)
    assert {s.padded for s in shards} == {per * size} and {s.counts for s in shards} == {shards[0].counts}
    owner = [p // per for p in pos]  # the reference: the slice that holds each scoring position
    for r, s in enumerate(shards):
        assert (s.start, s.stop) == (r * per, (r + 1) * per)
        assert list(range(s.m_start, s.m_stop)) == [m for m, o in enumerate(owner) if o == r]
        assert s.counts[r] == s.m_stop - s.m_start
    assert sum(shards[0].counts) == len(pos)
    # a rollout straddles a split whenever its scoring positions fall into two slices
    if size > 1 and any(owner[m] != owner[m + 1] for m in range(len(pos) - 1)):
        assert sum(1 for c in shards[0].counts if c) > 1


def test_the_padding_is_a_sequence_of_its_own() -> None:
    ids, positions = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[0, 1, 2, 0, 1]])
    padded_ids, padded_pos = pad_row(ids, positions, 8, pad_id=0)
    assert padded_ids.tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]] and padded_pos.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert pad_row(ids, positions, 5, pad_id=0)[0] is ids
    with pytest.raises(ValueError, match="cannot be padded to 4"):
        pad_row(ids, positions, 4, pad_id=0)


def test_a_row_with_shared_prompts_is_refused_naming_the_key() -> None:
    rng = random.Random(0)
    prompt = [7, 8, 9, 10]
    rollouts = [_rollout(rng, 0, prompt), _rollout(rng, 1, prompt)]
    inputs = collate_packed(rollouts, [0, 1], pad_id=0, share_prompts=True)
    assert inputs.shared_prompts
    with pytest.raises(ValueError, match="train.share_prompts=false"):
        shard_row(inputs.score_pos_M, inputs.input_ids_1N.shape[1], 2, 0)
