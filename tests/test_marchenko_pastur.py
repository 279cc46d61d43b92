"""Marchenko-Pastur bulk, spikes and the Spectrum SNR, against independent references.

Tolerances:
- mp_density moments (closed forms: mass 1, mean 1, second moment 1 + y): absolute 1e-7;
- mp_median against scipy quad on the raw density + brentq (no substitution): relative 1e-7;
  against the median eigenvalue of a 4000 x 2000 Gaussian matrix: relative 2e-3 (the
  finite-size shift of the median is O(1/M));
- mp_sigma of a pure Gaussian matrix: relative 2% of the true sigma (observed < 0.3%);
- spike counts: exact (Tracy-Widom margin on);
- spectrum_snr against the reference written here: relative 1e-12.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize

import spectune
from spectune.analyze import marchenko_pastur as mp
from spectune.analyze import spectral

# --- the MP law itself -------------------------------------------------------------------


def mp_pdf_reference(x: float, y: float) -> float:
    """Unit-variance MP density for ratio y <= 1, written from the textbook form."""
    lo, hi = (1 - math.sqrt(y)) ** 2, (1 + math.sqrt(y)) ** 2
    if not lo < x < hi:
        return 0.0
    return math.sqrt((hi - x) * (x - lo)) / (2 * math.pi * y * x)


def median_by_quad(y: float) -> float:
    """Median of the MP law by plain adaptive quadrature on the density and a root find."""
    lo, hi = (1 - math.sqrt(y)) ** 2, (1 + math.sqrt(y)) ** 2

    def cdf(t: float) -> float:
        # integrable endpoint singularities (1/sqrt(x) at 0 for y = 1): tell quad where they are
        return integrate.quad(mp_pdf_reference, lo, t, args=(y,), limit=500, epsabs=1e-13, epsrel=1e-13)[0]

    return optimize.brentq(lambda t: cdf(t) - 0.5, lo + 1e-12, hi - 1e-12, xtol=1e-14)


@pytest.mark.parametrize("y", [0.1, 0.25, 0.5, 0.75, 1.0])
def test_mp_density_matches_textbook_and_moments(y):
    lo, hi = (1 - math.sqrt(y)) ** 2, (1 + math.sqrt(y)) ** 2
    xs = np.linspace(lo - 0.1, hi + 0.1, 97)
    np.testing.assert_allclose(mp.mp_density(xs, y), [mp_pdf_reference(x, y) for x in xs], rtol=1e-13, atol=0)

    def moment(k):
        return integrate.quad(lambda x: x**k * float(mp.mp_density(x, y)), lo, hi, limit=500)[0]

    assert moment(0) == pytest.approx(1.0, abs=1e-7)
    assert moment(1) == pytest.approx(1.0, abs=1e-7)  # E[x] = sigma^2 = 1
    assert moment(2) == pytest.approx(1.0 + y, abs=1e-7)  # E[x^2] = 1 + y


@pytest.mark.parametrize("y", [0.1, 0.25, 0.5, 0.75, 1.0, 768 / 3072])
def test_mp_median_against_direct_quadrature(y):
    assert mp.mp_median(y) == pytest.approx(median_by_quad(y), rel=1e-7)


def test_mp_median_against_a_large_random_matrix():
    rng = np.random.default_rng(0)
    n, m = 4000, 2000  # y = 0.5
    g = rng.standard_normal((n, m))
    lam = np.linalg.eigvalsh(g.T @ g / n)
    assert mp.mp_median(0.5) == pytest.approx(float(np.median(lam)), rel=2e-3)


# --- pure noise and planted spikes ----------------------------------------------------------

SHAPES = [(1000, 400), (400, 1000), (768, 768), (1536, 384)]
SIGMA = 0.037


def noise(rows: int, cols: int, seed: int) -> np.ndarray:
    return SIGMA * np.random.default_rng(seed).standard_normal((rows, cols))


def with_spikes(w: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Add k orthogonal rank-one spikes with singular values 3x to 4.5x the bulk edge."""
    rows, cols = w.shape
    rng = np.random.default_rng(1000 + seed)
    u = np.linalg.qr(rng.standard_normal((rows, k)))[0]
    v = np.linalg.qr(rng.standard_normal((cols, k)))[0]
    edge_s = SIGMA * (math.sqrt(rows) + math.sqrt(cols))  # largest singular value of the bulk
    return w + (u * (3.0 * edge_s * np.linspace(1.0, 1.5, k))) @ v.T


def eigs(w: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues of W^T W (squared singular values), by numpy."""
    return np.sort(np.linalg.svd(w, compute_uv=False) ** 2)


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_pure_noise_no_spikes_and_sigma(rows, cols, seed):
    w = noise(rows, cols, seed)
    lam = eigs(w)
    fit = mp.fit_mp(lam, rows, cols, tw_margin=True)
    assert fit.num_spikes == 0
    assert fit.sigma == pytest.approx(SIGMA, rel=0.02)
    # bulk_max written out: sigma_hat^2 from the median of lam / N over our own median,
    # times the unit edge plus WeightWatcher's margin, back in units of lam
    n_big, m_small = max(rows, cols), min(rows, cols)
    y = m_small / n_big
    sigma2 = float(np.median(lam / n_big)) / median_by_quad(y)
    edge = (1 + math.sqrt(y)) ** 2
    margin = math.sqrt((1 / y) ** -0.5 * edge ** (2 / 3) * m_small ** (-2 / 3))
    assert fit.bulk_max == pytest.approx((edge + margin) * sigma2 * n_big, rel=1e-7)
    assert fit.softrank == pytest.approx(fit.bulk_max / lam[-1], rel=1e-12)
    plain = mp.fit_mp(lam, rows, cols, tw_margin=False)
    assert plain.bulk_max == pytest.approx(edge * sigma2 * n_big, rel=1e-7)
    # the sample's top eigenvalue sits at the edge, within a few percent
    assert lam[-1] == pytest.approx(plain.bulk_max, rel=0.05)


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_planted_spikes_counted_exactly(rows, cols, k):
    w = with_spikes(noise(rows, cols, seed=k), k, seed=k)
    fit = mp.fit_mp(eigs(w), rows, cols, tw_margin=True)
    assert fit.num_spikes == k
    # a few spikes barely move the median: sigma is still the bulk's
    assert fit.sigma == pytest.approx(SIGMA, rel=0.02)


class Holder(torch.nn.Module):
    def __init__(self, mats):
        super().__init__()
        for i, m in enumerate(mats):
            self.register_parameter(f"m{i}", torch.nn.Parameter(torch.as_tensor(m), requires_grad=False))


def test_engine_columns_noise_and_spikes():
    """Through spectune.analyze: 0, 1, 3, 5 spikes in four same-shape float32 matrices."""
    rows, cols = 1000, 400
    base = [noise(rows, cols, seed=10 + k) for k in (0, 1, 3, 5)]
    mats = [base[0]] + [with_spikes(b, k, seed=k) for b, k in zip(base[1:], (1, 3, 5))]
    mats32 = [m.astype(np.float32) for m in mats]
    res = spectune.analyze(Holder(mats32), progress=False, device="cpu", tw_margin=True)
    m = res.metrics.set_index("name")
    for i, k in enumerate((0, 1, 3, 5)):
        row = m.loc[f"m{i}"]
        assert row["status"] == "ok"
        assert int(row["num_spikes"]) == k
        assert row["mp_sigma"] == pytest.approx(SIGMA, rel=0.02)
        s = np.sort(np.linalg.svd(mats32[i].astype(np.float64), compute_uv=False))
        assert row["snr"] == pytest.approx(snr_reference(s, rows, cols), rel=1e-9)


# --- Spectrum's SNR -----------------------------------------------------------------------


def quantile_linear(sorted_x: np.ndarray, q: float) -> float:
    """Quantile with linear interpolation between order statistics (torch/numpy default)."""
    h = (len(sorted_x) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(sorted_x) - 1)
    return float(sorted_x[lo] + (h - lo) * (sorted_x[hi] - sorted_x[lo]))


def snr_reference(s: np.ndarray, rows: int, cols: int) -> float:
    """Spectrum: sigma = IQR(s)/1.349, thr = sigma (1 + sqrt(beta)), (sum above / sum below) / s_max."""
    xs = sorted(float(v) for v in s)
    sigma_hat = (quantile_linear(np.array(xs), 0.75) - quantile_linear(np.array(xs), 0.25)) / 1.349
    beta = min(rows, cols) / max(rows, cols)
    thr = sigma_hat * (1 + math.sqrt(beta))
    signal = math.fsum(v for v in xs if v > thr)
    noise_ = math.fsum(v for v in xs if v <= thr)
    return math.inf if noise_ == 0 else signal / noise_ / max(xs)


@pytest.mark.parametrize("rows,cols", [(300, 100), (100, 300), (128, 128), (257, 31)])
@pytest.mark.parametrize("seed", range(3))
def test_spectrum_snr_matches_reference(rows, cols, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)) * 0.02
    w += np.outer(rng.standard_normal(rows), rng.standard_normal(cols)) * 0.01 * (seed + 1)
    s = np.sort(np.linalg.svd(w, compute_uv=False))
    assert spectral.spectrum_snr(s, rows, cols) == pytest.approx(snr_reference(s, rows, cols), rel=1e-12)


def test_spectrum_snr_by_hand():
    # s = 1..8: q25 = 2.75, q75 = 6.25, sigma = 3.5/1.349; beta = 1 for a square matrix
    s = np.arange(1.0, 9.0)
    thr = 3.5 / 1.349 * 2.0  # 5.189...
    expected = (6 + 7 + 8) / (1 + 2 + 3 + 4 + 5) / 8.0
    assert thr == pytest.approx(5.1890289, rel=1e-6)
    assert spectral.spectrum_snr(s, 8, 8) == pytest.approx(expected, rel=1e-12)


def test_spectrum_snr_no_noise_is_inf():
    # all singular values equal: IQR = 0, threshold 0, everything is "signal"
    assert spectral.spectrum_snr(np.full(16, 2.0), 32, 16) == math.inf


# --- the default spike rule, measured over many draws (issue 11) ------------------------------

RATE_SHAPES = [(128, 128), (1024, 128), (128, 1024), (512, 256), (768, 768), (2048, 256)]  # square to 1:8
DRAWS = 40


def bbp_threshold(rows: int, cols: int, sigma: float) -> float:
    """Signal singular value above which a rank-one spike separates from the bulk: sigma (N M)^(1/4)."""
    return sigma * (rows * cols) ** 0.25


@pytest.mark.parametrize("rows,cols", RATE_SHAPES)
def test_default_rule_keeps_false_spikes_under_5_percent_and_finds_planted_ones(rows, cols):
    false_spike, exact = 0, 0
    for draw in range(DRAWS):
        rng = np.random.default_rng(draw)
        w = 0.05 * rng.standard_normal((rows, cols))
        false_spike += mp.fit_mp(eigs(w), rows, cols).num_spikes > 0  # the default rule
        k = 3
        u = np.linalg.qr(rng.standard_normal((rows, k)))[0]
        v = np.linalg.qr(rng.standard_normal((cols, k)))[0]
        strength = 2.0 * bbp_threshold(rows, cols, 0.05) * np.linspace(1.0, 1.5, k)
        exact += mp.fit_mp(eigs(w + (u * strength) @ v.T), rows, cols).num_spikes == k
    assert false_spike / DRAWS <= 0.05
    assert exact / DRAWS >= 0.95


def test_the_plain_edge_is_the_rule_that_invents_spikes():
    """The reason for the default: without the margin, pure noise shows spikes well above 5% of the time."""
    hits = sum(mp.fit_mp(eigs(0.05 * np.random.default_rng(d).standard_normal((1024, 128))), 1024, 128,
                         tw_margin=False).num_spikes > 0 for d in range(DRAWS))
    assert hits / DRAWS > 0.05
