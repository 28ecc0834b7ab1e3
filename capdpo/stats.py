"""The percentile bootstrap behind every confidence interval of capdpo: over the questions, resampled
with replacement, for a mean (``capdpo.repro``) and for a difference of two means (``capdpo.evaluation.compare``).

A difference is *paired* when both sides scored the same questions: each replicate resamples the
questions once and takes both means over them, which cancels the questions' own difficulty.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LEVEL = 0.95


def resample_indices(n: int, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """``resamples`` rows of ``n`` item indices drawn with replacement."""
    return rng.integers(0, n, size=(resamples, n))


def resampled_means(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The mean of ``values`` over each row of ``idx``: one bootstrap replicate per row."""
    return values[idx].mean(axis=1)


def percentile_interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of the replicates."""
    tail = (100 - 100 * level) / 2  # exactly 2.5 for 0.95 (``(1 - 0.95) / 2 * 100`` is not)
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_mean(values: Sequence[float], resamples: int, seed: int, level: float = LEVEL) -> tuple[float, float, float]:
    """Mean of ``values`` and its ``level`` percentile-bootstrap interval: ``(mean, low, high)``."""
    x = np.asarray(values, dtype=float)
    means = resampled_means(x, resample_indices(len(x), np.random.default_rng(seed), resamples))
    return (float(x.mean()), *percentile_interval(means, level))


def bootstrap_diff(base: dict[str, float], other: dict[str, float], rng: np.random.Generator,
                   resamples: int) -> tuple[np.ndarray, bool] | None:
    """``resamples`` bootstrap replicates of mean(other) - mean(base), and whether they were
    paired (both scored the same item ids); None when either side is empty."""
    if not base or not other:
        return None
    if base.keys() == other.keys():
        ids = sorted(base)
        a, b = np.array([base[i] for i in ids]), np.array([other[i] for i in ids])
        idx = resample_indices(len(ids), rng, resamples)
        return resampled_means(b, idx) - resampled_means(a, idx), True
    a, b = np.array(list(base.values())), np.array(list(other.values()))
    ia, ib = resample_indices(len(a), rng, resamples), resample_indices(len(b), rng, resamples)
    return resampled_means(b, ib) - resampled_means(a, ia), False
