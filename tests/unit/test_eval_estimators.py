"""Avg@k, unbiased pass@k and the bootstrap best-of-k against hand-computed cases."""

from __future__ import annotations

import math
import random

import pytest

from scope_ds.evaluation.estimators import (
    avg_at_k,
    bootstrap_best_of_k,
    k_values,
    pass_at_k,
    pass_at_k_single,
    summarize,
)


def _binomial_reference(n: int, c: int, k: int) -> float:
    """The textbook form with exact integers (fine for small n)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_hand_cases() -> None:
    # n = k: pass@n is 1 as soon as one sample is correct, 0 otherwise.
    assert pass_at_k_single(4, 1, 4) == 1.0
    assert pass_at_k_single(4, 0, 4) == 0.0
    # c = 0 and c = n, for any k <= n.
    for k in (1, 2, 3):
        assert pass_at_k_single(3, 0, k) == 0.0
        assert pass_at_k_single(3, 3, k) == 1.0
    # k = 1 is the share of correct samples.
    assert pass_at_k_single(4, 1, 1) == pytest.approx(0.25)
    # n = 4, c = 1, k = 2: 1 - C(3,2)/C(4,2) = 1 - 3/6.
    assert pass_at_k_single(4, 1, 2) == pytest.approx(0.5)
    # n = 5, c = 2, k = 3: 1 - C(3,3)/C(5,3) = 1 - 1/10.
    assert pass_at_k_single(5, 2, 3) == pytest.approx(0.9)


def test_pass_at_k_matches_binomials_and_is_stable() -> None:
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k_single(n, c, k) == pytest.approx(_binomial_reference(n, c, k), abs=1e-12)
    # C(1000, 500) overflows a float; the product form does not.
    value = pass_at_k_single(1000, 3, 500)
    assert value == pytest.approx(_binomial_reference(1000, 3, 500), rel=1e-12)
    assert 0.0 < value < 1.0


def test_pass_at_k_refuses_n_below_k() -> None:
    with pytest.raises(ValueError, match="n=2 < k=4"):
        pass_at_k_single(2, 1, 4)
    with pytest.raises(ValueError, match="n=3 < k=4"):
        pass_at_k([[True] * 8, [False] * 3], 4)  # one short prompt is enough to refuse
    with pytest.raises(ValueError):
        pass_at_k_single(4, 5, 1)  # c > n
    with pytest.raises(ValueError):
        pass_at_k_single(4, 1, 0)


def test_benchmark_level_means() -> None:
    correct = [[True, False, False, False], [True, True, True, True], [False] * 4]
    assert avg_at_k(correct) == pytest.approx((0.25 + 1 + 0) / 3)
    assert pass_at_k(correct, 1) == pytest.approx(avg_at_k(correct))
    assert pass_at_k(correct, 2) == pytest.approx((0.5 + 1 + 0) / 3)
    assert pass_at_k(correct, 4) == pytest.approx(2 / 3)  # prompts with at least one correct sample
    with pytest.raises(ValueError):
        avg_at_k([])
    with pytest.raises(ValueError):
        avg_at_k([[True], []])


def test_bootstrap_hand_cases_and_determinism() -> None:
    # All-correct and all-wrong prompts do not depend on the draws.
    assert bootstrap_best_of_k([[True] * 3], 8) == 1.0
    assert bootstrap_best_of_k([[False] * 3], 8) == 0.0
    correct = [[True, False, False, False], [True, True, False, False, False, False]]
    a = bootstrap_best_of_k(correct, 4, resamples=500, seed=7)
    assert a == bootstrap_best_of_k(correct, 4, resamples=500, seed=7)
    assert a != bootstrap_best_of_k(correct, 4, resamples=500, seed=8)
    # Its expectation is 1 - (1 - c/n)^k per prompt; 20000 resamples land within a few 1e-3.
    expected = ((1 - 0.75**4) + (1 - (4 / 6) ** 4)) / 2
    assert bootstrap_best_of_k(correct, 4, resamples=20000, seed=0) == pytest.approx(expected, abs=0.01)
    # k > n is allowed (draws repeat), unlike the unbiased estimator.
    assert 0.0 < bootstrap_best_of_k([[True, False]], 4, seed=0) < 1.0


def test_bootstrap_reads_no_higher_than_unbiased_on_average() -> None:
    rng = random.Random(0)
    for _ in range(20):
        n = rng.choice([4, 8, 16])
        correct = [[rng.random() < rng.random() for _ in range(n)] for _ in range(10)]
        for k in k_values(n)[1:]:
            boot = bootstrap_best_of_k(correct, k, resamples=4000, seed=rng.randrange(1 << 30))
            assert boot <= pass_at_k(correct, k) + 0.02  # Monte-Carlo slack; the expectation is <=
    # One correct sample in 8, k = n = 8: unbiased pass@8 is 1, the bootstrap 1 - (7/8)^8 = 0.656.
    correct = [[True] + [False] * 7] * 5
    assert pass_at_k(correct, 8) == 1.0
    assert bootstrap_best_of_k(correct, 8, resamples=4000, seed=0) == pytest.approx(1 - (7 / 8) ** 8, abs=0.02)


def test_k_values_and_summary() -> None:
    assert k_values(1) == [1]
    assert k_values(32) == [1, 2, 4, 8, 16, 32]
    assert k_values(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError):
        k_values(0)
    summary = summarize([[True, False], [False, False]], seed=3)
    assert summary["n"] == 2 and summary["prompts"] == 2 and summary["samples"] == 4
    assert summary["avg"] == pytest.approx(0.25)
    assert summary["pass_at_k"] == {1: pytest.approx(0.25), 2: pytest.approx(0.5)}
    assert set(summary["bootstrap_best_of_k"]) == {1, 2}
