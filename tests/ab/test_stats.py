"""Statistics against scipy and hand computation; SRM on skewed and fair splits."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from cobra_scale.ab import stats


def test_ztest_matches_scipy_chi2_and_hand():
    k_t, n_t, k_c, n_c = 530, 10_000, 480, 10_200
    res = stats.two_proportion_ztest(k_t, n_t, k_c, n_c)
    # by hand
    p = (k_t + k_c) / (n_t + n_c)
    z = (k_t / n_t - k_c / n_c) / math.sqrt(p * (1 - p) * (1 / n_t + 1 / n_c))
    assert res.statistic == pytest.approx(z, rel=1e-12)
    # the pooled z-test is the uncorrected 2x2 chi-square test
    chi2, p_chi, _, _ = sps.chi2_contingency([[k_t, n_t - k_t], [k_c, n_c - k_c]], correction=False)
    assert res.statistic**2 == pytest.approx(chi2, rel=1e-10)
    assert res.p_value == pytest.approx(p_chi, rel=1e-10)
    assert stats.two_proportion_ztest(0, 10, 0, 10).p_value == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_welch_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.lognormal(1.0, 1.2, 700) * (rng.random(700) < 0.1)
    b = rng.lognormal(1.1, 1.0, 1300) * (rng.random(1300) < 0.12)
    res = stats.welch_ttest(stats.Moments.of(a), stats.Moments.of(b))
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert res.statistic == pytest.approx(ref.statistic, rel=1e-10)
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert res.df == pytest.approx(ref.df, rel=1e-10)


def test_delta_lift_by_hand():
    t, c = stats.Moments(1000, 0.12, 0.1057), stats.Moments(1000, 0.10, 0.0901)
    lift = stats.delta_lift(t, c, alpha=0.05)
    se = math.sqrt((0.1057 / 1000) / 0.10**2 + 0.12**2 * (0.0901 / 1000) / 0.10**4)
    assert lift.lift == pytest.approx(0.2)
    assert lift.high - lift.lift == pytest.approx(1.959963984540054 * se, rel=1e-9)
    assert lift.lift - lift.low == pytest.approx(1.959963984540054 * se, rel=1e-9)


def test_bootstrap_means_match_plain_resampling():
    """The sparse shortcut draws from the same distribution as resampling all users."""
    rng = np.random.default_rng(0)
    x = np.where(rng.random(400) < 0.1, rng.lognormal(2, 1, 400), 0.0)
    fast = stats.bootstrap_means(x, 8000, np.random.default_rng(1))
    plain = x[np.random.default_rng(2).integers(0, len(x), (8000, len(x)))].mean(1)
    assert fast.mean() == pytest.approx(plain.mean(), rel=0.02)
    assert fast.std() == pytest.approx(plain.std(), rel=0.05)
    assert fast.std() == pytest.approx(x.std() / math.sqrt(len(x)), rel=0.05)


def test_bootstrap_and_delta_agree_on_large_samples():
    rng = np.random.default_rng(3)
    t = (rng.random(20_000) < 0.055).astype(float)
    c = (rng.random(20_000) < 0.050).astype(float)
    d = stats.delta_lift(stats.Moments.of(t), stats.Moments.of(c))
    b = stats.bootstrap_lift(t, c, resamples=4000, seed=0)
    assert b.lift == pytest.approx(d.lift)
    assert b.low == pytest.approx(d.low, abs=0.015) and b.high == pytest.approx(d.high, abs=0.015)


def test_delta_ci_coverage_on_aa_tests():
    """Over 400 simulated A/A tests the 95% interval covers 0 about 95% of the time."""
    rng = np.random.default_rng(4)
    covered = 0
    for _ in range(400):
        t, c = rng.random(3000) < 0.08, rng.random(3000) < 0.08
        lift = stats.delta_lift(stats.Moments.of(t), stats.Moments.of(c))
        covered += lift.low <= 0.0 <= lift.high
    assert 0.92 <= covered / 400 <= 0.98


def test_srm_detected_on_skewed_not_on_fair_split():
    rng = np.random.default_rng(5)
    fair = np.bincount(rng.random(100_000) < 0.5, minlength=2)
    skewed = np.bincount(rng.random(100_000) < 0.49, minlength=2)  # a 49/51 split sold as 50/50
    assert stats.srm_test(fair, [0.5, 0.5]).p_value > 0.001
    assert stats.srm_test(skewed, [0.5, 0.5]).p_value < 1e-6
    # unequal promised shares and three arms; against scipy
    obs = [2010, 4950, 3040]
    res = stats.srm_test(obs, [0.2, 0.5, 0.3])
    ref = sps.chisquare(obs, [2000, 5000, 3000])
    assert res.statistic == pytest.approx(ref.statistic) and res.p_value == pytest.approx(ref.pvalue)
    assert res.p_value > 0.001
