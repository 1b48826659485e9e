"""The statistics of an A/B decision, from per-user outcomes or their sufficient statistics.

* conversion: two-proportion z-test (pooled variance), ``p = 2 * (1 - Phi(|z|))``
* ARPU: Welch's t-test (unequal variances, Welch–Satterthwaite degrees of freedom)
* relative lift ``mean_t / mean_c - 1`` with a (1 - alpha) CI by the delta method
  (first-order variance of a ratio of independent means) and by the percentile bootstrap
* sample-ratio mismatch: chi-square goodness of fit of users per arm against the shares
  the config promises

Distribution functions come from scipy; the tests hold every number to scipy's own tests
(``ttest_ind``, ``chi2_contingency``, ``chisquare``) or to a hand computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of one arm's per-user metric."""

    n: int  # users
    mean: float
    var: float  # sample variance (ddof=1); 0 when n < 2

    @classmethod
    def of(cls, x: np.ndarray) -> "Moments":
        x = np.asarray(x, dtype=np.float64)
        return cls(len(x), float(x.mean()) if len(x) else math.nan, float(x.var(ddof=1)) if len(x) > 1 else 0.0)


@dataclass(frozen=True)
class TestResult:
    statistic: float
    p_value: float
    df: float = math.inf  # degrees of freedom (Welch); inf for the z-test


@dataclass(frozen=True)
class Lift:
    """Relative lift ``treatment / control - 1`` and its (1 - alpha) confidence interval."""

    lift: float
    low: float
    high: float


def two_proportion_ztest(k_t: int, n_t: int, k_c: int, n_c: int) -> TestResult:
    """Two-sided z-test of equal conversion rates, pooled variance (``z^2`` = the uncorrected 2x2 chi-square)."""
    if min(n_t, n_c) <= 0:
        return TestResult(math.nan, math.nan)
    p_t, p_c = k_t / n_t, k_c / n_c
    pooled = (k_t + k_c) / (n_t + n_c)
    se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n_t + 1.0 / n_c))
    if se == 0.0:  # no conversion (or all converted) in both arms: no evidence either way
        return TestResult(0.0, 1.0)
    z = (p_t - p_c) / se
    return TestResult(z, float(2.0 * sps.norm.sf(abs(z))))


def welch_ttest(t: Moments, c: Moments) -> TestResult:
    """Two-sided Welch t-test of equal means (what ``scipy.stats.ttest_ind(equal_var=False)`` computes)."""
    if min(t.n, c.n) < 2:
        return TestResult(math.nan, math.nan, math.nan)
    a, b = t.var / t.n, c.var / c.n
    se2 = a + b
    if se2 == 0.0:
        return TestResult(0.0 if t.mean == c.mean else math.copysign(math.inf, t.mean - c.mean), 1.0 if t.mean == c.mean else 0.0, math.nan)
    stat = (t.mean - c.mean) / math.sqrt(se2)
    df = se2**2 / (a**2 / (t.n - 1) + b**2 / (c.n - 1))
    return TestResult(stat, float(2.0 * sps.t.sf(abs(stat), df)), df)


def delta_lift(t: Moments, c: Moments, alpha: float = 0.05) -> Lift:
    """Relative lift with a delta-method CI.

    ``Var(mt/mc) ~= Var(mt)/mc^2 + mt^2 Var(mc)/mc^4`` with ``Var(m) = s^2 / n`` (arms independent).
    """
    if not c.mean or min(t.n, c.n) < 2:
        return Lift(math.nan, math.nan, math.nan)
    ratio = t.mean / c.mean
    var = (t.var / t.n) / c.mean**2 + (t.mean**2) * (c.var / c.n) / c.mean**4
    half = sps.norm.ppf(1.0 - alpha / 2.0) * math.sqrt(var)
    return Lift(ratio - 1.0, ratio - 1.0 - half, ratio - 1.0 + half)


def bootstrap_means(x: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples,) means of ``x`` resampled with replacement.

    Exact and cheap for sparse metrics (revenue, conversion: mostly zeros): a resample of n
    users holds Binomial(n, nnz/n) non-zero users, drawn uniformly from the non-zeros.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    nonzero = x[x != 0]
    if n == 0:
        return np.full(resamples, math.nan)
    if len(nonzero) == 0:
        return np.zeros(resamples)
    counts = rng.binomial(n, len(nonzero) / n, resamples)
    draws = nonzero[rng.integers(0, len(nonzero), int(counts.sum()))]
    sums = np.bincount(np.repeat(np.arange(resamples), counts), weights=draws, minlength=resamples)
    return sums / n


def bootstrap_lift(x_t: np.ndarray, x_c: np.ndarray, resamples: int = 2000, alpha: float = 0.05, seed: int = 0) -> Lift:
    """Relative lift with a percentile-bootstrap CI (arms resampled independently)."""
    x_t, x_c = np.asarray(x_t, dtype=np.float64), np.asarray(x_c, dtype=np.float64)
    if len(x_t) == 0 or len(x_c) == 0 or not x_c.mean():
        return Lift(math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    mt, mc = bootstrap_means(x_t, resamples, rng), bootstrap_means(x_c, resamples, rng)
    ratios = np.divide(mt, mc, out=np.full(resamples, np.nan), where=mc != 0) - 1.0
    ratios = ratios[np.isfinite(ratios)]
    lift = x_t.mean() / x_c.mean() - 1.0
    if len(ratios) < 0.9 * resamples:  # control mean 0 in many resamples: the interval is meaningless
        return Lift(lift, math.nan, math.nan)
    low, high = np.quantile(ratios, [alpha / 2.0, 1.0 - alpha / 2.0])
    return Lift(lift, float(low), float(high))


def srm_test(observed: list[int] | np.ndarray, expected_shares: list[float] | np.ndarray) -> TestResult:
    """Chi-square goodness of fit of users per arm against the promised shares (df = arms - 1)."""
    obs = np.asarray(observed, dtype=np.float64)
    shares = np.asarray(expected_shares, dtype=np.float64)
    if len(obs) < 2 or obs.sum() == 0:
        return TestResult(math.nan, math.nan, math.nan)
    expected = shares / shares.sum() * obs.sum()
    chi2 = float(((obs - expected) ** 2 / expected).sum())
    df = len(obs) - 1
    return TestResult(chi2, float(sps.chi2.sf(chi2, df)), float(df))
