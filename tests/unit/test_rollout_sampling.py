"""Next-token sampling of the embedded server: truncation rules and the log-prob convention."""

from __future__ import annotations

import torch

from scope_ds.rollout.server.sampling import BatchSampling, SamplingSpec, keyed_uniform, sample_next


def batch(*specs: SamplingSpec, vocab: int = 10) -> BatchSampling:
    return BatchSampling.from_specs(list(specs), vocab)


def test_greedy_rows_take_argmax_and_report_raw_logprobs():
    torch.manual_seed(0)
    logits = torch.randn(3, 10)
    tokens, lps, _ = sample_next(logits, batch(*[SamplingSpec(greedy=True)] * 3))
    assert tokens.tolist() == logits.argmax(-1).tolist()
    ref = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    assert torch.allclose(lps, ref)


def test_logprobs_are_temperature_scaled_and_ignore_truncation():
    torch.manual_seed(1)
    logits = torch.randn(2, 10)
    bs = batch(SamplingSpec(temperature=0.5, top_k=3), SamplingSpec(temperature=2.0, top_p=0.5))
    tokens, lps, full = sample_next(logits, bs, torch.Generator().manual_seed(0))
    temps = torch.tensor([[0.5], [2.0]])
    ref_full = torch.log_softmax(logits / temps, -1)
    assert torch.allclose(full, ref_full)
    assert torch.allclose(lps, ref_full.gather(-1, tokens[:, None]).squeeze(-1))


def test_top_k_top_p_min_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    gen = torch.Generator().manual_seed(0)
    for spec, allowed in [
        (SamplingSpec(top_k=2), {0, 1}),
        (SamplingSpec(top_p=0.7), {0, 1}),  # mass before token 2 is 0.8 > 0.7
        (SamplingSpec(top_p=0.81), {0, 1, 2}),
        (SamplingSpec(min_p=0.5), {0, 1}),  # 0.15 < 0.5 * 0.5
        (SamplingSpec(top_p=1e-6), {0}),  # the first-ranked token always stays
    ]:
        tokens, _, _ = sample_next(logits, batch(*[spec] * 400, vocab=4), gen)
        assert set(tokens.tolist()) == allowed, spec


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().repeat(20000, 1)
    tokens, _, _ = sample_next(logits, batch(*[SamplingSpec()] * 20000, vocab=3), torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=3).float() / 20000
    assert torch.allclose(freq, probs, atol=0.02)


def test_mixed_batch_and_row_selection():
    torch.manual_seed(2)
    logits = torch.randn(3, 10)
    bs = batch(SamplingSpec(greedy=True), SamplingSpec(temperature=0.7), SamplingSpec(greedy=True))
    tokens, _, _ = sample_next(logits, bs, torch.Generator().manual_seed(0))
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    kept = bs.select(torch.tensor([2, 1]))
    assert kept.greedy_B.tolist() == [True, False] and kept.temperature_B.tolist() == [1.0, 0.699999988079071]


def test_seeded_generator_is_reproducible():
    logits = torch.randn(4, 10)
    bs = batch(*[SamplingSpec()] * 4)
    a, _, _ = sample_next(logits, bs, torch.Generator().manual_seed(5))
    b, _, _ = sample_next(logits, bs, torch.Generator().manual_seed(5))
    assert a.tolist() == b.tolist()


def test_keyed_rows_follow_the_distribution_and_ignore_the_batch():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3], dtype=torch.float64)  # token 1 has no mass
    logits = probs.float().log().repeat(6000, 1)
    keys = [(1000 + i, 5) for i in range(6000)]
    tokens, _, _ = sample_next(logits, batch(*[SamplingSpec()] * 6000, vocab=4), None, keys)
    freq = torch.bincount(tokens, minlength=4).double() / 6000
    assert freq[1] == 0 and torch.allclose(freq, probs, atol=0.02), freq
    # Row 7's key among other rows and an unseeded one: the same token.
    alone, _, _ = sample_next(
        logits[:3], batch(*[SamplingSpec()] * 3, vocab=4), torch.Generator(), [(3, 9), (1007, 5), None]
    )
    assert alone[1] == tokens[7]


def test_keyed_draws_are_uniform_and_unrelated_across_seeds_and_positions():
    """keyed_uniform(seed, position): U[0, 1) over positions of one seed and over seeds at one
    position, and no correlation between neighbouring keys (samples j and j + 1 of a prompt use
    seeds s and s + 1; a linear mix of seed and position would tie (s, p + 1) to (s + 1, p))."""
    n = 20000
    grid = torch.tensor([[keyed_uniform(seed, pos) for pos in range(2)] for seed in range(n + 1)], dtype=torch.float64)
    along = torch.tensor([keyed_uniform(12345, pos) for pos in range(n)], dtype=torch.float64)
    for u in (grid[:, 0], along):
        assert 0 <= u.min() and u.max() < 1
        assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
        assert torch.histc(u, bins=10, min=0, max=1).div(len(u)).sub(0.1).abs().max() < 0.01
    pairs = {
        "next seed": (grid[:-1, 0], grid[1:, 0]),
        "next position": (grid[:, 0], grid[:, 1]),
        "diagonal": (grid[:-1, 1], grid[1:, 0]),
        "along": (along[:-1], along[1:]),
    }
    for name, (a, b) in pairs.items():
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.03, name
