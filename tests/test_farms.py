"""FARMS alpha estimator: window layout, pooling, and the aspect-ratio bias it removes.

The references are independent of the fits: window spectra from numpy's SVD of the
slices, pooled CDFs from the windows' own CDFs, and the Marchenko-Pastur population
value of the median-xmin Hill exponent from numerical integration of the MP density.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from spectune.analyze import analyze, compute, powerlaw

CPU = torch.device("cpu")


def mp_median_hill(ratio: float) -> float:
    """Limit of the median-xmin Hill alpha for MP(ratio = short/long): 1 + 1 / E[ln(lam/m) | lam >= m]."""
    from scipy import integrate, optimize

    a, b = (1 - math.sqrt(ratio)) ** 2, (1 + math.sqrt(ratio)) ** 2

    def density(x: float) -> float:
        return math.sqrt(max((b - x) * (x - a), 0.0)) / (2 * math.pi * ratio * x)

    median = optimize.brentq(lambda m: integrate.quad(density, a, m, limit=200)[0] - 0.5, a + 1e-12, b)
    mean_log = integrate.quad(lambda x: math.log(x / median) * density(x), median, b, limit=200)[0] / 0.5
    return 1.0 + 1.0 / mean_log


def spectrum(w: torch.Tensor) -> np.ndarray:
    return compute.eigenvalues([w], CPU, torch.float64)[0][0].numpy()


def farms_spectrum(w: torch.Tensor, **kw: float) -> np.ndarray:
    win = powerlaw.farms_windows(*w.shape, **kw)  # type: ignore[arg-type]
    return powerlaw.pool_spectra([compute.window_eigenvalues([w], win, CPU, torch.float64)[0].numpy()])


def hill_pair(w: torch.Tensor) -> tuple[float, float]:
    """(plain median-xmin Hill alpha, FARMS alpha) of one matrix."""
    return powerlaw.fit_median(spectrum(w)).alpha, powerlaw.fit_median(farms_spectrum(w)).alpha


def generator(kind: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) if kind == "gaussian" else rng.standard_t(3.0, size=shape)
    return torch.from_numpy(x)


# --- window layout -------------------------------------------------------------------------


def test_square_matrix_is_its_own_window():
    win = powerlaw.farms_windows(384, 384)
    assert win.count == 1 and win.covers(384, 384)


def test_tall_and_wide_windows_are_square_and_span_the_long_side():
    tall = powerlaw.farms_windows(1024, 256, per_dim=10)
    assert (tall.rows, tall.cols) == (256, 256) and tall.col_starts == (0,)
    assert tall.row_starts[0] == 0 and tall.row_starts[-1] == 1024 - 256 and len(tall.row_starts) == 10
    assert np.all(np.diff(tall.row_starts) > 0)
    wide = powerlaw.farms_windows(256, 1024, per_dim=10)
    assert (wide.rows, wide.cols) == (256, 256) and wide.row_starts == (0,) and wide.col_starts == tall.row_starts
    # a window cap below both sides slides in both directions, like the reference code's 2-D grid
    grid = powerlaw.farms_windows(300, 200, window=100, per_dim=3)
    assert (grid.rows, grid.cols) == (100, 100) and grid.row_starts == (0, 100, 200) and grid.col_starts == (0, 50, 100)
    # fewer possible offsets than per_dim: every offset once
    assert powerlaw.farms_windows(260, 256, per_dim=10).row_starts == (0, 1, 2, 3, 4)


def test_aspect_ratio_windows_put_their_long_side_along_the_matrix_long_side():
    win = powerlaw.farms_windows(1024, 256, aspect=2.0)
    assert (win.rows, win.cols) == (512, 256)
    win = powerlaw.farms_windows(256, 300, aspect=2.0)  # 300 / 2 = 150 caps the short side
    assert (win.rows, win.cols) == (150, 300)
    with pytest.raises(ValueError, match="farms_aspect"):
        powerlaw.farms_windows(10, 10, aspect=0.5)


# --- pooled spectrum ----------------------------------------------------------------------


def test_window_spectra_match_numpy_svd_of_the_slices():
    w = generator("gaussian", (90, 40), 0)
    win = powerlaw.farms_windows(*w.shape, window=30, per_dim=3)
    got = compute.window_eigenvalues([w], win, CPU, torch.float64)[0].numpy()
    x = w.numpy()
    ref = [np.linalg.svd(x[r : r + win.rows, c : c + win.cols], compute_uv=False) ** 2
           for r in win.row_starts for c in win.col_starts]
    assert got.size == win.count * 30
    np.testing.assert_allclose(np.sort(got), np.sort(np.concatenate(ref)), rtol=1e-9, atol=1e-10)


def test_pooled_spectrum_is_the_average_of_the_window_esds():
    rng = np.random.default_rng(1)
    spectra = [np.sort(rng.exponential(size=50)) for _ in range(4)]
    pooled = powerlaw.pool_spectra(spectra)
    for x in np.quantile(pooled, [0.1, 0.37, 0.5, 0.81, 0.99]):
        avg_cdf = np.mean([np.mean(s <= x) for s in spectra])
        assert np.mean(pooled <= x) == pytest.approx(avg_cdf, abs=1e-12)


# --- the aspect-ratio bias ----------------------------------------------------------------

# The FARMS gap between the two shapes is sampling noise, mostly the square matrix's own: its
# standard deviation over 30 seed pairs at 256 / 1024 x 256 was 0.014 (Gaussian) and 0.025
# (Student-t, 3 degrees of freedom), over 12 pairs at 768 / 3072 x 768 0.006 and 0.007, while
# plain Hill differed by at least 1.04. The tolerances are about 4 standard deviations of
# the quantity tested (a mean over 4 pairs at 256, one pair at 768).
FARMS_TOL_256_MEAN_OF_4 = 0.05
FARMS_TOL_768 = 0.03


@pytest.mark.parametrize("kind,hill_gap", [("gaussian", 1.2), ("student_t3", 0.9)])
def test_same_generator_aspect_1_and_4_hill_differs_farms_agrees(kind, hill_gap):  # type: ignore[no-untyped-def]
    square = [hill_pair(generator(kind, (256, 256), seed)) for seed in range(4)]
    tall = [hill_pair(generator(kind, (1024, 256), seed + 100)) for seed in range(4)]
    h1, f1 = np.mean(square, axis=0)
    h4, f4 = np.mean(tall, axis=0)
    assert h4 - h1 > hill_gap  # the 4:1 matrix looks far less heavy-tailed to plain Hill
    assert all(f == pytest.approx(h, abs=1e-12) for h, f in square)  # a square matrix is its own single window
    assert abs(f4 - f1) < FARMS_TOL_256_MEAN_OF_4


@pytest.mark.parametrize("kind", ["gaussian", "student_t3"])
@pytest.mark.parametrize("seed", [0, 10])
def test_issue_sizes_768_and_3072_agree(kind, seed):  # type: ignore[no-untyped-def]
    h1, f1 = hill_pair(generator(kind, (768, 768), seed))
    h4, f4 = hill_pair(generator(kind, (3072, 768), seed + 1))
    assert abs(f4 - f1) < FARMS_TOL_768 and h4 - h1 > 1.0


def test_plain_hill_on_gaussian_follows_the_mp_shape_of_each_aspect_ratio():
    # the bias is the Marchenko-Pastur shape: MP(1) and MP(1/4) give different population alphas
    a1, a4 = mp_median_hill(1.0), mp_median_hill(0.25)
    assert a4 - a1 > 1.0
    assert powerlaw.fit_median(spectrum(generator("gaussian", (512, 512), 3))).alpha == pytest.approx(a1, abs=0.04)
    assert powerlaw.fit_median(spectrum(generator("gaussian", (2048, 512), 4))).alpha == pytest.approx(a4, abs=0.04)


@pytest.mark.parametrize("shape", [(256, 256), (1024, 256), (256, 768), (600, 300)])
def test_farms_on_gaussian_noise_is_the_mp_aspect_1_value(shape):  # type: ignore[no-untyped-def]
    # square windows: the pooled ESD is MP with ratio 1 whatever the matrix's shape
    alpha = powerlaw.fit_median(farms_spectrum(generator("gaussian", shape, 5))).alpha
    assert alpha == pytest.approx(mp_median_hill(1.0), abs=0.05)


def test_farms_aspect_2_windows_give_the_mp_aspect_2_value():
    alpha = powerlaw.fit_median(farms_spectrum(generator("gaussian", (1024, 300), 6), aspect=2.0)).alpha
    assert alpha == pytest.approx(mp_median_hill(0.5), abs=0.05)


# --- thinned KS candidates -------------------------------------------------------------------


def test_fit_ks_max_candidates_is_the_scan_over_those_candidates():
    rng = np.random.default_rng(7)
    lam = np.sort(rng.pareto(1.5, size=700) + 1.0)
    fit = powerlaw.fit_ks(lam, max_candidates=50)
    cand = np.unique(np.round(np.linspace(0, lam.size - 2, 50)).astype(int))
    best = None
    for i in cand:  # an independent loop over the same candidates
        a = powerlaw.hill_alpha(lam, int(i))
        if not a > 1:
            continue
        tail = lam[i:]
        d = np.max(np.abs(1 - (tail / tail[0]) ** (1 - a) - np.arange(tail.size) / tail.size))
        if best is None or d < best[0]:
            best = (d, a, lam[i])
    assert best is not None
    assert fit.ks_distance == pytest.approx(best[0], rel=1e-9) and fit.alpha == pytest.approx(best[1], rel=1e-9)
    assert fit.xmin == best[2]
    assert powerlaw.fit_ks(lam, max_candidates=10_000) == powerlaw.fit_ks(lam)  # more than n: every candidate


# --- the analysis run ----------------------------------------------------------------------


def _two_shapes() -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Linear(128, 128, bias=False), torch.nn.Linear(128, 512, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(generator("student_t3", (128, 128), 8))
        net[1].weight.copy_(generator("student_t3", (512, 128), 9))
    return net


def test_analyze_records_the_estimator_and_fits_the_pooled_spectrum():
    net = _two_shapes()
    hill = analyze(net, progress=False)
    farms = analyze(net, progress=False, alpha_estimator="farms")
    assert set(hill.metrics["alpha_estimator"]) == {"hill"} and hill.alpha_estimator == "hill"
    assert set(farms.metrics["alpha_estimator"]) == {"farms"} and farms.summary()["model"]["alpha_estimator"] == "farms"
    h = hill.metrics.set_index("name")
    f = farms.metrics.set_index("name")
    sq, tall = "0.weight", "1.weight"
    assert f.loc[sq, "alpha_hill"] == pytest.approx(h.loc[sq, "alpha_hill"], rel=1e-12)  # one window: own spectrum
    expected = powerlaw.fit_median(farms_spectrum(net[1].weight.detach().double())).alpha
    assert f.loc[tall, "alpha_hill"] == pytest.approx(expected, rel=1e-9)
    assert f.loc[tall, "stable_rank"] == pytest.approx(h.loc[tall, "stable_rank"], rel=1e-12)  # only alpha changes
    assert abs(f.loc[tall, "alpha_hill"] - f.loc[sq, "alpha_hill"]) < abs(h.loc[tall, "alpha_hill"] - h.loc[sq, "alpha_hill"])


def test_unknown_estimator_is_an_error_naming_the_field():
    with pytest.raises(ValidationError, match="alpha_estimator"):
        analyze(_two_shapes(), progress=False, alpha_estimator="pareto")
