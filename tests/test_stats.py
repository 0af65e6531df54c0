"""Paired comparisons: McNemar's exact p-value against hand-computed binomial sums, and the paired
bootstrap CI against the normal approximation and against its own invariants."""
import math

import numpy as np
import pytest

from distill_jax import stats


def _pairs(only_a: int, only_b: int, both: int = 0, neither: int = 0):
    a = np.array([1] * only_a + [0] * only_b + [1] * both + [0] * neither, bool)
    b = np.array([0] * only_a + [1] * only_b + [1] * both + [0] * neither, bool)
    return a, b


def _two_sided_binomial(k: int, n: int) -> float:
    """2 * P(X <= min(k, n - k)) for X ~ Binomial(n, 1/2), capped at 1."""
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize("only_a,only_b", [(10, 2), (2, 10), (30, 18), (5, 5), (1, 0), (40, 0)])
def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_clips(only_a, only_b):
    a, b = _pairs(only_a, only_b, both=50, neither=7)  # concordant clips do not count
    assert stats.mcnemar_p(a, b) == pytest.approx(_two_sided_binomial(only_a, only_a + only_b), rel=1e-9)
    assert stats.mcnemar_p(*_pairs(10, 2)) == pytest.approx(158 / 4096, rel=1e-9)  # 2 (1 + 12 + 66) / 2^12


def test_mcnemar_without_discordant_clips_is_one():
    assert stats.mcnemar_p(*_pairs(0, 0, both=5, neither=3)) == 1.0


def test_bootstrap_ci_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    n = 2000
    b = rng.random(n) < 0.7
    a = np.where(rng.random(n) < 0.15, ~b, b)  # 15 % of clips flip
    diff, (lo, hi) = stats.paired_bootstrap_ci(a, b, seed=1)
    d = a.astype(float) - b.astype(float)
    half = 1.96 * d.std(ddof=1) / np.sqrt(n)
    assert diff == pytest.approx(d.mean())
    assert lo == pytest.approx(diff - half, abs=0.15 * half) and hi == pytest.approx(diff + half, abs=0.15 * half)
    assert stats.paired_bootstrap_ci(a, b, seed=1) == (diff, (lo, hi))  # seeded


def test_bootstrap_ci_invariants():
    a, b = _pairs(0, 0, both=30, neither=10)  # identical answers: no uncertainty about a zero difference
    assert stats.paired_bootstrap_ci(a, b) == (0.0, (0.0, 0.0))
    a, b = _pairs(20, 0)  # a right on every clip, b on none
    assert stats.paired_bootstrap_ci(a, b) == (1.0, (1.0, 1.0))
    # Strata keep each stratum's clip count: two strata with different differences give a narrower CI
    # than pooling them without strata would allow to drift.
    a1, b1 = _pairs(40, 0, both=60)  # stratum 0: +0.4
    a2, b2 = _pairs(0, 0, both=100)  # stratum 1: 0
    a, b = np.concatenate([a1, a2]), np.concatenate([b1, b2])
    strata = np.repeat([0, 1], 100)
    diff, (lo, hi) = stats.paired_bootstrap_ci(a, b, strata=strata)
    _, (plo, phi) = stats.paired_bootstrap_ci(a, b)
    assert diff == pytest.approx(0.2) and lo < diff < hi and (hi - lo) < (phi - plo)


def test_compare_reports_every_field():
    a, b = _pairs(30, 10, both=50, neither=10)
    out = stats.compare(a, b, strata=np.zeros(100, int))
    assert out["a"] == pytest.approx(0.8) and out["b"] == pytest.approx(0.6) and out["diff"] == pytest.approx(0.2)
    assert out["clips"] == 100 and out["discordant"] == [30, 10]
    assert out["ci95"][0] < 0.2 < out["ci95"][1]
    assert out["p_value"] == pytest.approx(_two_sided_binomial(10, 40))
    assert stats.mean_sd([0.5]) == (0.5, 0.0)
    assert stats.mean_sd([0.5, 0.7]) == pytest.approx((0.6, np.std([0.5, 0.7], ddof=1)))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="aligned"):
        stats.mcnemar_p([1, 0], [1])
    with pytest.raises(ValueError, match="no clips"):
        stats.compare([], [])
    with pytest.raises(ValueError, match="strata"):
        stats.paired_bootstrap_ci([1, 0], [0, 1], strata=[0])
