"""The table maths of a study: spread over seeds, and paired differences with a bootstrap interval.

Pure functions on numbers; no I/O. A paired difference compares two arms on the same prompts under
the same seeds: ``diff[s][p]`` is arm minus baseline on prompt p of the run with seed s (a per-prompt
Avg@n or Pass@k), for each benchmark. Its interval resamples seeds and prompts (each with
replacement, independently: a crossed bootstrap), since both vary between studies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Spread:
    mean: float
    sd: float  # sample standard deviation over seeds (n - 1); 0 for a single seed
    n: int  # seeds behind it

    def to_json(self) -> dict[str, float]:
        return {"mean": self.mean, "sd": self.sd, "n": self.n}


def spread(values: Sequence[float]) -> Spread:
    """Mean and sample standard deviation of one figure over seeds."""
    if not values:
        raise ValueError("spread of no values")
    x = np.asarray(values, dtype=np.float64)
    return Spread(float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0, len(x))


@dataclass(frozen=True)
class Paired:
    diff: float  # mean difference, arm - baseline
    lo: float  # bootstrap percentile interval
    hi: float
    confidence: float

    def to_json(self) -> dict[str, float]:
        return {"diff": self.diff, "lo": self.lo, "hi": self.hi, "confidence": self.confidence}


def paired_difference(
    diffs: Sequence[np.ndarray], resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> Paired:
    """Mean over benchmarks of the mean paired difference, with a percentile interval.

    ``diffs[b]``: benchmark b's [seeds, prompts] array of per-prompt differences (every benchmark
    with the same seeds in the same order). Each resample draws the seeds once (shared by the
    benchmarks, as a seed is one training run) and each benchmark's prompts, with replacement.
    """
    arrays = [np.asarray(d, dtype=np.float64) for d in diffs]
    if not arrays or any(a.ndim != 2 or 0 in a.shape for a in arrays):
        raise ValueError("paired_difference needs one non-empty [seeds, prompts] array per benchmark")
    seeds = arrays[0].shape[0]
    if any(a.shape[0] != seeds for a in arrays):
        raise ValueError(f"every benchmark needs the same seeds, got {[a.shape for a in arrays]}")
    point = math.fsum(float(a.mean()) for a in arrays) / len(arrays)
    rng = np.random.default_rng(seed)
    stats = np.zeros(resamples)
    s_idx = rng.integers(0, seeds, size=(resamples, seeds))
    for a in arrays:
        p_idx = rng.integers(0, a.shape[1], size=(resamples, a.shape[1]))
        # mean over the resampled seeds x prompts grid, without forming it: rows, then columns
        rows_RSP = a[s_idx]  # [resamples, seeds, prompts]
        stats += np.take_along_axis(rows_RSP, p_idx[:, None, :].repeat(seeds, axis=1), axis=2).mean(axis=(1, 2))
    stats /= len(arrays)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return Paired(point, float(lo), float(hi), confidence)
