"""Power-law (Hill) fits against closed forms, a direct loop, and WeightWatcher's WWFit.

A spectrum whose eigenvalues are the exact mid-point quantiles of a Pareto law,
lam_k = xmin (1 - u_k)^(-1/(alpha-1)) with u_k = (k - 1/2)/n, has tail exponent
alpha everywhere above xmin, so both xmin rules must give back alpha.

Tolerances:
- recovery of alpha from n = 2000 exact quantiles: relative 5e-3 (the discretisation
  bias of the Hill estimator on quantiles is ~ log(n)/n ~ 1e-3 here);
- fit_ks against the loop written below (WeightWatcher's fit_power_law_standard
  convention): alpha and D relative 1e-9, xmin identical (same index chosen);
- hill_alpha against the textbook formula: relative 1e-12.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from spectune.analyze import powerlaw

N = 2000


def pareto_quantiles(alpha: float, n: int = N, xmin: float = 0.3) -> np.ndarray:
    u = (np.arange(1, n + 1) - 0.5) / n
    return xmin * (1.0 - u) ** (-1.0 / (alpha - 1.0))


def hill_reference(x: np.ndarray, i: int) -> float:
    """Textbook Hill/MLE: alpha = 1 + n / sum_j ln(x_j / x_min) over the n values >= x_min."""
    xs = np.sort(x)
    xmin = xs[i]
    tail = xs[i:]
    return 1.0 + tail.size / math.fsum(math.log(v / xmin) for v in tail)


def ks_fit_loop(x: np.ndarray) -> tuple[float, float, float]:
    """Plain loop over every candidate xmin but the largest value; smallest KS distance wins.

    Empirical CDF convention np.arange(n)/n, as WeightWatcher's fit_power_law_standard.
    """
    xs = np.sort(np.asarray(x, dtype=np.float64))
    best = (math.inf, math.nan, math.nan)  # (D, alpha, xmin)
    for i in range(xs.size - 1):
        xmin = xs[i]
        tail = xs[i:]
        n = tail.size
        alpha = 1.0 + n / sum(math.log(v / xmin) for v in tail) if tail[-1] > xmin else math.nan
        if not alpha > 1:
            continue
        d = max(abs(1.0 - (tail[k] / xmin) ** (1.0 - alpha) - k / n) for k in range(n))
        if d < best[0]:
            best = (d, alpha, xmin)
    d, alpha, xmin = best
    return alpha, xmin, d


# --- recovery on exact Pareto quantiles -----------------------------------------------------


@pytest.mark.parametrize("alpha", [2.0, 2.5, 4.0])
def test_fit_median_recovers_alpha(alpha):
    lam = pareto_quantiles(alpha)
    fit = powerlaw.fit_median(lam)
    assert fit.alpha == pytest.approx(alpha, rel=5e-3)
    assert fit.xmin == lam[N // 2]
    assert fit.n_tail == N - N // 2
    # KS distance of a perfect power law is only the discretisation of the empirical CDF
    assert 0 <= fit.ks_distance < 5.0 / fit.n_tail


@pytest.mark.parametrize("alpha", [2.0, 2.5, 4.0])
def test_fit_ks_recovers_alpha(alpha):
    lam = pareto_quantiles(alpha)
    fit = powerlaw.fit_ks(lam)
    assert fit.alpha == pytest.approx(alpha, rel=5e-3)
    # the whole sample is one power law: the chosen xmin is near the bottom
    assert fit.n_tail > N // 2
    assert fit.xmin == lam[N - fit.n_tail]
    assert 0 <= fit.ks_distance < 5.0 / fit.n_tail


@pytest.mark.parametrize("alpha", [2.5, 4.0])
def test_fit_ks_finds_the_tail_above_a_bulk(alpha):
    """Uniform bulk below xmin = 1, Pareto tail above: the KS scan finds xmin and alpha."""
    bulk = np.linspace(0.05, 0.95, 1000)
    tail = pareto_quantiles(alpha, n=1000, xmin=1.0)
    lam = np.sort(np.concatenate([bulk, tail]))
    fit = powerlaw.fit_ks(lam)
    assert fit.xmin == pytest.approx(1.0, rel=0.05)
    assert fit.alpha == pytest.approx(alpha, rel=0.02)
    # the median rule puts xmin at the top of the bulk and is biased: only the KS rule must recover
    med = powerlaw.fit_median(lam)
    assert med.xmin == lam[1000]


# --- hill_alpha and ks_distance against direct formulas ----------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_hill_alpha_matches_formula(seed):
    rng = np.random.default_rng(seed)
    x = np.sort(rng.lognormal(mean=0.0, sigma=1.5, size=300))
    for i in (0, 1, 37, 150, 298):
        assert powerlaw.hill_alpha(x, i) == pytest.approx(hill_reference(x, i), rel=1e-12)


def test_hill_alpha_degenerate_tail_is_nan():
    assert math.isnan(powerlaw.hill_alpha(np.array([1.0, 2.0, 2.0, 2.0]), 1))


def test_ks_distance_matches_formula():
    rng = np.random.default_rng(11)
    x = np.sort(rng.pareto(1.7, size=200) + 1.0)
    i, alpha = 20, 2.4
    tail = x[i:]
    n = tail.size
    ref = max(abs((1 - (tail[k] / tail[0]) ** (1 - alpha)) - k / n) for k in range(n))
    assert powerlaw.ks_distance(x, i, alpha) == pytest.approx(ref, rel=1e-12)


# --- fit_ks against a loop over candidates ---------------------------------------------------


def _samples():
    rng = np.random.default_rng(2024)
    yield "pareto_2.3", np.sort(rng.pareto(1.3, size=400) + 1.0)
    yield "lognormal", np.sort(rng.lognormal(0.0, 1.0, size=350))
    # Marchenko-Pastur-like bulk plus a few large spikes (a typical weight spectrum)
    g = rng.standard_normal((300, 120))
    lam = np.linalg.eigvalsh(g.T @ g / 300)
    yield "mp_plus_spikes", np.sort(np.concatenate([lam, [8.0, 15.0, 40.0]]))
    yield "exponential", np.sort(rng.exponential(1.0, size=257))


SAMPLES = dict(_samples())


@pytest.mark.parametrize("name", list(SAMPLES))
@pytest.mark.parametrize("max_block", [4096, 7])
def test_fit_ks_matches_loop(name, max_block):
    x = SAMPLES[name]
    alpha, xmin, d = ks_fit_loop(x)
    fit = powerlaw.fit_ks(x, max_block=max_block)
    assert fit.xmin == xmin
    assert fit.alpha == pytest.approx(alpha, rel=1e-9)
    assert fit.ks_distance == pytest.approx(d, rel=1e-9)
    assert fit.n_tail == int(np.count_nonzero(x >= xmin))


def test_fit_ks_all_equal_is_nan_for_value_one():
    # ln 1 = 0: every Hill denominator is exactly 0, no candidate is valid
    fit = powerlaw.fit_ks(np.full(300, 1.0))
    assert math.isnan(fit.alpha) and fit.n_tail == 0


@pytest.mark.parametrize("value", [0.5, 2.0, 3.0, 7.0])
def test_fit_ks_all_equal_is_nan(value):
    # every candidate tail is constant: sum_j ln(lam_j / xmin) = 0 exactly, no power law exists
    x = np.full(300, value)
    assert all(math.isnan(powerlaw.hill_alpha(x, i)) for i in range(299))
    fit = powerlaw.fit_ks(x)
    assert math.isnan(fit.alpha) and fit.n_tail == 0


# --- WeightWatcher's own fitter -----------------------------------------------------------------


@pytest.fixture(scope="module")
def wwfit_class():
    pytest.importorskip("weightwatcher")
    mod = pytest.importorskip("weightwatcher.WW_powerlaw")
    return mod.WWFit


@pytest.mark.parametrize("name", list(SAMPLES))
def test_fit_ks_matches_weightwatcher_wwfit(name, wwfit_class):
    # WWFit(data, xmin=None, xmax=None, distribution='power_law'); for N >= 20 it runs
    # fit_power_law_standard (smaller samples use a bias-corrected variant we do not copy)
    x = SAMPLES[name]
    ww = wwfit_class(x)
    fit = powerlaw.fit_ks(x)
    assert fit.xmin == ww.xmin
    assert fit.alpha == pytest.approx(ww.alpha, rel=1e-9)
    assert fit.ks_distance == pytest.approx(ww.D, rel=1e-9)


@pytest.mark.parametrize("alpha", [2.0, 4.0])
def test_pareto_quantiles_match_weightwatcher_wwfit(alpha, wwfit_class):
    lam = pareto_quantiles(alpha)
    ww = wwfit_class(lam)
    fit = powerlaw.fit_ks(lam)
    assert fit.xmin == ww.xmin
    assert fit.alpha == pytest.approx(ww.alpha, rel=1e-9)
    assert fit.ks_distance == pytest.approx(ww.D, rel=1e-9)
