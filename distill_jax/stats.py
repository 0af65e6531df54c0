"""Uncertainty of paired accuracy comparisons: paired bootstrap CIs and McNemar's exact test.

Two models answer the same clips; `a` and `b` are their per-clip correctness (booleans, aligned).
The difference of accuracies gets a percentile bootstrap CI that resamples clips (both models'
answers on a clip stay together), stratified by `strata` (e.g. the seed each clip's world came
from, so every resample keeps each seed's clip count); the p-value is McNemar's exact test of
"the two models are equally accurate" on the discordant clips (one right, the other wrong).
"""
from __future__ import annotations

import numpy as np
from scipy import stats as scipy_stats

NUM_RESAMPLES = 10_000


def _aligned(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"a and b must be 1-D and aligned (one entry per clip), got shapes {a.shape}, {b.shape}")
    if not a.size:
        raise ValueError("no clips to compare")
    return a, b


def mcnemar_p(a, b) -> float:
    """Two-sided exact McNemar p-value: binomial test of the discordant counts against 1/2
    (1.0 when no clip is discordant)."""
    a, b = _aligned(a, b)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 1.0
    return float(scipy_stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def paired_bootstrap_ci(a, b, *, strata=None, num_resamples: int = NUM_RESAMPLES, seed: int = 0,
                        level: float = 0.95) -> tuple[float, tuple[float, float]]:
    """(mean(a) - mean(b), (lo, hi)): the percentile bootstrap CI of the accuracy difference,
    resampling clips with replacement within each stratum. Seeded: the same inputs give the same CI."""
    a, b = _aligned(a, b)
    diff = a.astype(np.float64) - b.astype(np.float64)
    strata = np.zeros(len(a), np.int64) if strata is None else np.asarray(strata)
    if strata.shape != a.shape:
        raise ValueError(f"strata must have one entry per clip, got shape {strata.shape} for {a.shape}")
    rng = np.random.default_rng(seed)
    totals = np.zeros(num_resamples)
    for value in np.unique(strata):
        members = diff[strata == value]
        picks = rng.integers(0, len(members), size=(num_resamples, len(members)))
        totals += members[picks].sum(axis=1)
    resampled = totals / len(a)
    tail = (1 - level) / 2
    lo, hi = np.quantile(resampled, [tail, 1 - tail])
    return float(diff.mean()), (float(lo), float(hi))


def compare(a, b, *, strata=None, seed: int = 0) -> dict:
    """{"a", "b" (accuracies), "diff", "ci95" [lo, hi], "p_value", "clips", "discordant" [a only, b only]}."""
    a, b = _aligned(a, b)
    diff, (lo, hi) = paired_bootstrap_ci(a, b, strata=strata, seed=seed)
    return {"a": float(a.mean()), "b": float(b.mean()), "diff": diff, "ci95": [lo, hi],
            "p_value": mcnemar_p(a, b), "clips": int(a.size),
            "discordant": [int(np.sum(a & ~b)), int(np.sum(~a & b))]}


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value) of per-seed figures."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0
