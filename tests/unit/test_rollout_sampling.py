"""Next-token sampling of the embedded server: truncation rules and the log-prob convention."""

from __future__ import annotations

import torch

from scope_ds.rollout.server.sampling import BatchSampling, SamplingSpec, sample_next


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


def test_rows_with_their_own_generators_follow_the_distribution_and_ignore_the_batch():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3], dtype=torch.float64)  # token 1 has no mass
    logits = probs.float().log().repeat(6000, 1)
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(6000)]
    tokens, _, _ = sample_next(logits, batch(*[SamplingSpec()] * 6000, vocab=4), None, gens)
    freq = torch.bincount(tokens, minlength=4).double() / 6000
    assert freq[1] == 0 and torch.allclose(freq, probs, atol=0.02), freq
    # Row 7 alone, from a fresh generator of the same seed, in a batch of other rows: the same token.
    shuffled = [torch.Generator().manual_seed(s) for s in (3, 1007, 5)]
    alone, _, _ = sample_next(logits[:3], batch(*[SamplingSpec()] * 3, vocab=4), torch.Generator(), shuffled)
    assert alone[1] == tokens[7]
