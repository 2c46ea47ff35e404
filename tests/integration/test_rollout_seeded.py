"""Seeded sampling (sampling_seed): the same rollouts whatever else shares the batch."""

from __future__ import annotations

from scope_ds.rollout.client import SyncRolloutClient


def test_seeded_rollouts_do_not_depend_on_batching(tiny_llama_dir, embedded_servers):
    (server,) = embedded_servers(tiny_llama_dir, random_seed=0)
    params = {"temperature": 1.0, "max_new_tokens": 12}
    prompts = [[1, 40 + i, 50 + i] for i in range(6)]
    with SyncRolloutClient([server.url]) as client:
        alone = client.generate_many(prompts[:1], params, n=3, seeds=[1000])
        # the same prompt and seed again, now among five other concurrent requests, and unseeded noise
        crowded = client.generate_many(prompts, params, n=3, seeds=[1000, 7, 8, 9, 10, 11])
        client.generate_many(prompts[:1], params, n=3)  # unseeded: moves the server-wide generator on
        again = client.generate_many(prompts[:1], params, n=3, seeds=[1000])
    ids = [[r.response_ids for r in g] for g in (alone[0], crowded[0], again[0])]
    assert ids[0] == ids[1] == ids[2]
    assert len({tuple(x) for x in ids[0]}) > 1, "the n samples of one seeded prompt must differ"
    for a, b in zip(alone[0], crowded[0], strict=True):
        assert a.behaviour_logprobs == b.behaviour_logprobs or all(
            abs(x - y) < 1e-4 for x, y in zip(a.behaviour_logprobs, b.behaviour_logprobs, strict=True)
        )


def test_a_seeded_sequence_continued_from_its_prefix_is_the_uninterrupted_one(tiny_llama_dir, embedded_servers):
    """Draws are keyed by (seed, position in the sequence), as in SGLang: a request for prompt +
    the first k tokens with the same seed samples the rest of the uninterrupted sequence."""
    (server,) = embedded_servers(tiny_llama_dir, random_seed=0)
    params = {"temperature": 1.0, "max_new_tokens": 20, "ignore_eos": True}
    prompt = [1, 40, 41]
    with SyncRolloutClient([server.url]) as client:
        (whole,) = client.generate_many([prompt], params, seeds=[77])[0]
        for k in (1, 7, 19):
            rest_params = {**params, "max_new_tokens": 20 - k}
            (rest,) = client.generate_many([prompt + whole.response_ids[:k]], rest_params, seeds=[77])[0]
            assert rest.response_ids == whole.response_ids[k:], k
            for a, b in zip(rest.behaviour_logprobs, whole.behaviour_logprobs[k:], strict=True):
                assert abs(a - b) < 1e-4
        (other,) = client.generate_many(
            [prompt + whole.response_ids[:7]], rest_params | {"max_new_tokens": 13}, seeds=[78]
        )[0]
    assert other.response_ids != whole.response_ids[7:], "another seed must sample otherwise"
