"""Partial rollouts against a real embedded server: a weight update in the middle of long
generations continues every sample from its tokens so far, with the new weights."""

from __future__ import annotations

import copy
import time

import httpx
import pytest
import torch

from scope_ds.rollout.client import SyncRolloutClient

PROMPTS = [[1, 20, 21, 22], [1, 30, 31]]
N, MAX_NEW, CONTEXT = 2, 600, 1024
PARAMS = {"max_new_tokens": MAX_NEW, "temperature": 1.0, "ignore_eos": True}
SEEDS = [100, 200]


@pytest.fixture(scope="module")
def weights(tiny_llama_builder, tmp_path_factory):
    """Two tiny Llamas of one architecture (versions 0 and 1 of a policy), long context."""
    root = tmp_path_factory.mktemp("partial")
    return [tiny_llama_builder(root / f"v{v}", seed=v, context=CONTEXT) for v in (0, 1)]


def _generate(client: SyncRolloutClient):
    return client.submit(client.client.generate_many(PROMPTS, PARAMS, n=N, seeds=SEEDS))


def _all_running(http: httpx.Client, url: str) -> None:
    """Once the server decodes every sample, let it sample a few tokens of each (a sample is
    counted as running from its admission, before its prefill)."""
    deadline = time.monotonic() + 30

    def state() -> dict:
        return http.get(f"{url}/server_info").json()["internal_states"][0]

    while (now := state())["num_running_reqs"] < len(PROMPTS) * N:
        assert time.monotonic() < deadline, "the server never ran every sample"
        time.sleep(0.005)
    while state()["generated_tokens"] < now["generated_tokens"] + 3 * len(PROMPTS) * N:
        assert time.monotonic() < deadline, "the server never sampled"
        time.sleep(0.005)


def _interrupt(url: str, folder, version: int) -> None:
    """Once every sample runs, a weight update as the trainer's sync makes it: pause in abort
    mode, load ``folder`` as ``version``, continue."""
    with httpx.Client(timeout=30, trust_env=False) as http:
        _all_running(http, url)
        http.post(f"{url}/pause_generation", json={"mode": "abort"}).raise_for_status()
        body = {"model_path": str(folder), "weight_version": str(version)}
        assert http.post(f"{url}/update_weights_from_disk", json=body).json()["success"]
        http.post(f"{url}/continue_generation", json={}).raise_for_status()


def _logprobs(folder, prompt: list[int], response: list[int]) -> torch.Tensor:
    """float32 log pi(a_t | prefix) of each response token under the model in ``folder`` (T = 1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def test_a_sync_mid_generation_continues_every_sample_with_the_new_weights(embedded_servers, weights):
    url = embedded_servers(weights[0])[0].url
    with SyncRolloutClient([url], timeout_s=120, max_abort_resubmits=0) as client:
        straight = [r for g in client.generate_many(PROMPTS, PARAMS, n=N, seeds=SEEDS) for r in g]
        future = _generate(client)
        _interrupt(url, weights[1], 1)
        interrupted = [r for g in future.result(timeout=120) for r in g]
    assert all(r.segments == [[0, 0]] and r.generated_tokens == MAX_NEW for r in straight)
    split = [r for r in interrupted if len(r.segments) == 2]
    assert split, f"no sample was interrupted: {[r.segments for r in interrupted]}"
    for before, r in zip(straight, interrupted, strict=True):
        assert r.finish_reason == "length" and r.response_length == MAX_NEW == r.generated_tokens
        assert len(r.behaviour_logprobs) == MAX_NEW and r.weight_version == 0
        (_, v0), *rest = r.segments
        assert v0 == 0 and all(v == 1 for _, v in rest)
        boundary = rest[0][0] if rest else MAX_NEW
        assert 0 < boundary <= MAX_NEW
        # before the boundary: exactly the tokens the same seed gives without a sync
        assert r.response_ids[:boundary] == before.response_ids[:boundary]
        prompt = r.prompt_ids
        assert prompt == before.prompt_ids and prompt in PROMPTS  # the original prompt, not prompt + prefix
        got = torch.tensor(r.behaviour_logprobs, dtype=torch.float64)
        old = _logprobs(weights[0], prompt, r.response_ids[:boundary])
        torch.testing.assert_close(got[:boundary], old, atol=1e-4, rtol=0)
        if rest:  # after it: the new weights' log-probs of the tokens they sampled
            new = _logprobs(weights[1], prompt, r.response_ids)[boundary:]
            torch.testing.assert_close(got[boundary:], new, atol=1e-4, rtol=0)


def test_samples_interrupted_more_often_than_the_resubmit_cap_finish(embedded_servers, weights):
    """max_abort_resubmits bounds aborts without progress only: three syncs, a cap of 1, all whole."""
    url = embedded_servers(weights[0])[0].url
    with SyncRolloutClient([url], timeout_s=120, max_abort_resubmits=1) as client:
        future = _generate(client)
        for version in (1, 2, 3):
            _interrupt(url, weights[version % 2], version)
        rollouts = [r for g in future.result(timeout=120) for r in g]
    assert all(r.finish_reason == "length" and r.response_length == MAX_NEW for r in rollouts)
    assert max(len(r.segments) for r in rollouts) == 4
    for r in rollouts:
        starts = [s for s, _ in r.segments]
        assert starts == sorted(set(starts)) and starts[0] == 0
        assert [v for _, v in r.segments] == sorted(v for _, v in r.segments)


def test_regenerating_throws_the_interrupted_tokens_away(embedded_servers, weights):
    """rollout.partial_rollouts=false: the old behaviour, for comparison; the waste is counted."""
    url = embedded_servers(weights[0])[0].url
    with SyncRolloutClient([url], timeout_s=120, partial_rollouts=False) as client:
        future = _generate(client)
        _interrupt(url, weights[1], 1)
        rollouts = [r for g in future.result(timeout=120) for r in g]
    assert all(r.response_length == MAX_NEW and len(r.segments) == 1 for r in rollouts)
    redone = [r for r in rollouts if r.generated_tokens > MAX_NEW]
    assert redone and all(r.segments == [[0, 1]] and r.weight_version == 1 for r in redone)


def test_held_samples_stand_still_and_continue_from_a_copy_as_they_would_have(embedded_servers, weights):
    """A checkpoint's snapshot of the samples in flight: ``held`` ends the requests out and shows
    every sample's tokens so far; continued from a copy of it by another client (a resumed run),
    each sample ends exactly as in the run that went on, and as without the hold (same seeds,
    same weights)."""
    url = embedded_servers(weights[0])[0].url
    samples = [[None] * N for _ in PROMPTS]
    with SyncRolloutClient([url], timeout_s=120) as client, httpx.Client(timeout=30, trust_env=False) as http:
        straight = [r for g in client.generate_many(PROMPTS, PARAMS, n=N, seeds=SEEDS) for r in g]
        future = client.submit(client.client.generate_many(PROMPTS, PARAMS, n=N, seeds=SEEDS, samples=samples))
        _all_running(http, url)
        snapshot = client.held(lambda: copy.deepcopy(samples))
        went_on = [r for g in future.result(timeout=120) for r in g]
    saved = [copy.deepcopy(r) for g in snapshot for r in g]  # the client continues `snapshot` in place
    assert all(r is not None and r.finish_reason == "abort" and r.response_length < MAX_NEW for r in saved)
    assert any(r.response_length > 0 for r in saved), [r.response_length for r in saved]
    with SyncRolloutClient([url], timeout_s=120) as other:
        resumed = [r for g in other.generate_many(PROMPTS, PARAMS, n=N, seeds=SEEDS, samples=snapshot) for r in g]
    for before, a, b, c in zip(saved, went_on, resumed, straight, strict=True):
        assert a.response_length == MAX_NEW == b.response_length
        assert a.response_ids == c.response_ids  # draws keyed by position: a hold changes no token
        assert a.response_ids[: before.response_length] == before.response_ids  # nothing lost at the hold
        assert a.segments == b.segments == ([[0, 0], [before.response_length, 0]] if before.response_ids else [[0, 0]])
        assert b.response_ids == a.response_ids
        torch.testing.assert_close(b.behaviour_logprobs, a.behaviour_logprobs, atol=1e-5, rtol=0)
