"""Rollouts to padded tensors (scope_ds.engines.batching.collate)."""

from __future__ import annotations

import pytest
import torch

from scope_ds.engines.batching import collate
from scope_ds.records import Rollout


def _rollout(prompt: list[int], response: list[int], logprobs: list[float], **ids: object) -> Rollout:
    return Rollout(prompt_ids=prompt, response_ids=response, behaviour_logprobs=logprobs, **ids)


def test_collate_pads_prompts_responses_and_behaviour_logprobs() -> None:
    a = _rollout([1, 5], [6, 7, 2], [-0.5, -1.0, -0.25])
    b = _rollout([1], [8], [-2.0])
    inputs = collate([a, None, b], [4, -1, 9], pad_id=0)
    assert inputs.input_ids_BL.tolist() == [[1, 5, 6, 7, 2], [0, 0, 0, 0, 0], [1, 8, 0, 0, 0]]
    assert inputs.attention_mask_BL.tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert inputs.resp_index_BT.tolist() == [[1, 2, 3], [0, 0, 0], [0, 0, 0]]
    assert inputs.mask_BT.tolist() == [[True] * 3, [False] * 3, [True, False, False]]
    expected = torch.tensor([[-0.5, -1.0, -0.25], [0.0, 0.0, 0.0], [-2.0, 0.0, 0.0]])
    assert torch.equal(inputs.old_logp_BT, expected) and inputs.rows == [4, -1, 9]


@pytest.mark.parametrize("logprobs", [[-0.5, -1.0], [], [-0.5, -1.0, -0.25, -3.0]])
def test_behaviour_logprobs_of_the_wrong_length_are_refused_naming_the_rollout(logprobs: list[float]) -> None:
    """A short, missing or long list would otherwise read as pi_old = 1 (log-prob 0) on some tokens."""
    good = _rollout([1], [8], [-2.0])
    bad = _rollout([1, 5], [6, 7, 2], logprobs, prompt_id="aime:3", group_id="12:3", sample_index=5, request_id="r9")
    with pytest.raises(ValueError) as info:
        collate([good, bad], [0, 1], pad_id=0)
    message = str(info.value)
    for part in ("'aime:3'", "'12:3'", "sample_index=5", "'r9'", f"{len(logprobs)} behaviour log-probs", "3 response"):
        assert part in message, message
