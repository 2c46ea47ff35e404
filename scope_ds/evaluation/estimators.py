"""Avg@k and Pass@k from per-prompt correctness: pure functions, no I/O.

Input everywhere: ``correct``, one sequence of booleans per prompt (that prompt's n samples, in
sample order). Prompts may have different n; every function below averages over prompts, each
prompt weighing the same.

Two Pass@k estimators, named apart because they answer different questions:
- :func:`pass_at_k` is the unbiased estimator of Chen et al. (2021): for a prompt with c correct
  out of n samples, the probability that k samples drawn *without* replacement from those n hold at
  least one correct one, ``1 - C(n-c, k) / C(n, k)``. It needs n >= k.
- :func:`bootstrap_best_of_k` is what the SCOPE authors' script reports: k draws *with* replacement,
  best of them, averaged over seeded resamples. Its expectation is ``1 - (1 - c/n)^k``, never above
  the unbiased figure, so it reads lower (the gap grows with k / n).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Correctness = Sequence[Sequence[bool]]  # per prompt, per sample


def avg_at_k(correct: Correctness) -> float:
    """Mean correctness over prompts of each prompt's mean over its samples (Avg@k, k = n).

    With the same n for every prompt (the usual case) this is the share of correct samples.
    """
    _check(correct)
    return float(np.mean([np.mean(np.asarray(c, dtype=np.float64)) for c in correct]))


def pass_at_k_single(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with ``c`` correct out of ``n`` samples (Chen et al. 2021).

    ``1 - C(n-c, k) / C(n, k)`` as the product ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``, which never
    forms the binomials (they overflow floats for n in the hundreds). Raises ValueError for k > n:
    then no k distinct samples exist and the estimator is undefined.
    """
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}")
    if n < k:
        raise ValueError(f"pass@k needs at least k samples per prompt, got n={n} < k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k(correct: Correctness, k: int) -> float:
    """Mean over prompts of :func:`pass_at_k_single`; ValueError if any prompt has fewer than k samples."""
    _check(correct)
    return float(np.mean([pass_at_k_single(len(c), int(sum(bool(x) for x in c)), k) for c in correct]))


def bootstrap_best_of_k(correct: Correctness, k: int, resamples: int = 1000, seed: int = 0) -> float:
    """The authors' bootstrap: per prompt, ``resamples`` times draw k of its samples with replacement
    and keep the best; the mean over resamples, then over prompts.

    Deterministic for a given ``seed`` (one numpy generator walks the prompts in order). Defined for
    any k >= 1, even k > n, since draws repeat.
    """
    _check(correct)
    if k < 1 or resamples < 1:
        raise ValueError(f"bootstrap best-of-k needs k >= 1 and resamples >= 1, got k={k}, resamples={resamples}")
    rng = np.random.default_rng(seed)
    means = []
    for c in correct:
        samples = np.asarray(c, dtype=bool)
        draws_RK = rng.integers(0, len(samples), size=(resamples, k))
        means.append(samples[draws_RK].any(axis=1).mean())
    return float(np.mean(means))


def k_values(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to n, and n itself when it is not a power of two."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]


def summarize(correct: Correctness, ks: Sequence[int] | None = None, resamples: int = 1000, seed: int = 0) -> dict:
    """Every figure for one benchmark: avg, pass@k and bootstrap best-of-k for each k (default k_values).

    ks default to :func:`k_values` of the smallest n over prompts, so that pass@k is defined.
    """
    _check(correct)
    n_min = min(len(c) for c in correct)
    ks = list(ks) if ks is not None else k_values(n_min)
    return {
        "n": n_min,
        "prompts": len(correct),
        "samples": sum(len(c) for c in correct),
        "avg": avg_at_k(correct),
        "pass_at_k": {int(k): pass_at_k(correct, k) for k in ks},
        "bootstrap_best_of_k": {int(k): bootstrap_best_of_k(correct, k, resamples, seed) for k in ks},
    }


def _check(correct: Correctness) -> None:
    if len(correct) == 0:
        raise ValueError("no prompts to score")
    for i, c in enumerate(correct):
        if len(c) == 0:
            raise ValueError(f"prompt {i} has no samples")
