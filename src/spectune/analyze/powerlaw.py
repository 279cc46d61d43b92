"""Heavy-tailed power-law fits of an eigenvalue spectrum (Hill estimators).

The eigenvalues ``lam`` are those of the correlation matrix W^T W (squared
singular values), sorted ascending, near-zero ones already removed. For a
power law p(lam) ~ lam^-alpha above ``xmin`` the maximum-likelihood (Hill)
estimate with xmin at index ``i`` is

    alpha = 1 + n / (sum_{j>=i} ln lam_j - n ln lam_i),   n = len(lam) - i.

Two rules choose ``xmin``:
- ``median``: xmin is the median eigenvalue (TempBalance, seed 003, AlphaPruning).
- ``ks``: every eigenvalue but the largest is tried and the one whose fit has the
  smallest Kolmogorov-Smirnov distance wins (Clauset et al. 2009; WeightWatcher's
  default, whose empirical CDF convention ``k/n`` we keep so numbers agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PowerLawFit:
    alpha: float
    xmin: float
    ks_distance: float
    n_tail: int


def hill_alpha(lam: np.ndarray, i: int) -> float:
    """Hill estimate with xmin = lam[i] (``lam`` ascending, positive)."""
    log_ratio = np.log(lam[i:] / lam[i])  # ratios, not differences of logs: a flat tail gives exactly 0
    n = log_ratio.size
    denom = log_ratio.sum()
    return float(1.0 + n / denom) if denom > 0 else float("nan")


def ks_distance(lam: np.ndarray, i: int, alpha: float) -> float:
    """Largest gap between the fitted power-law CDF and the empirical CDF above lam[i]."""
    tail = lam[i:]
    n = tail.size
    model_cdf = 1.0 - (tail / tail[0]) ** (1.0 - alpha)
    empirical = np.arange(n) / n
    return float(np.max(np.abs(model_cdf - empirical)))


def fit_median(lam: np.ndarray) -> PowerLawFit:
    """Single Hill estimate with xmin at the median eigenvalue (index n // 2)."""
    i = lam.size // 2
    alpha = hill_alpha(lam, i)
    d = ks_distance(lam, i, alpha) if np.isfinite(alpha) else float("nan")
    return PowerLawFit(alpha=alpha, xmin=float(lam[i]), ks_distance=d, n_tail=lam.size - i)


def fit_ks(lam: np.ndarray, max_block: int = 4096) -> PowerLawFit:
    """Hill estimate at every candidate xmin; keep the smallest KS distance.

    Vectorised over candidates in blocks (an n x n comparison for n candidates),
    so a 4096-eigenvalue spectrum costs one 128 MB block instead of 4096 loops.
    """
    n_all = lam.size
    loglam = np.log(lam)
    # suffix sums of log lam give every candidate's Hill denominator at once
    suffix = np.cumsum(loglam[::-1])[::-1]
    idx = np.arange(n_all - 1)
    n_tail = (n_all - idx).astype(np.float64)
    denom = suffix[idx] - n_tail * loglam[idx]
    # a constant tail (lam_i == lam_max) has no power law; the suffix-sum difference would
    # leave a rounding residue there instead of the exact 0 and give alpha ~ 1e16
    flat = lam[idx] >= lam[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = np.where((denom > 0) & ~flat, 1.0 + n_tail / denom, np.nan)
    ds = np.full(n_all - 1, np.inf)
    for start in range(0, n_all - 1, max_block):
        stop = min(start + max_block, n_all - 1)
        cand = idx[start:stop]
        a = alphas[start:stop]
        # ratio[c, j] = lam_j / lam_c for j >= c; entries below the diagonal are masked out
        ratio = lam[None, :] / lam[cand, None]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            model = 1.0 - ratio ** (1.0 - a[:, None])
        k = np.arange(n_all)[None, :] - cand[:, None]
        emp = k / n_tail[start:stop, None]
        gap = np.abs(model - emp)
        gap[k < 0] = -np.inf
        d = gap.max(axis=1)
        d[~(a > 1)] = np.inf
        ds[start:stop] = d
    if not np.isfinite(ds).any():
        return PowerLawFit(alpha=float("nan"), xmin=float("nan"), ks_distance=float("nan"), n_tail=0)
    best = int(np.argmin(ds))
    return PowerLawFit(
        alpha=float(alphas[best]), xmin=float(lam[best]), ks_distance=float(ds[best]), n_tail=n_all - best
    )
