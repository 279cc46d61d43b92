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

Which spectrum the fits read is the *alpha estimator* (docs/alpha-estimators.md):
``hill`` fits the matrix's own eigenvalues; ``farms`` (Hu et al., ICML 2025) fits
the pooled eigenvalues of fixed-aspect-ratio submatrices, whose layout
``farms_windows`` gives, so that matrices of different shapes are compared on the
same Marchenko-Pastur shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ESTIMATORS = ("hill", "farms")
# Elements of one block of the KS scan (candidates x eigenvalues). The scan is bound by memory
# traffic: blocks of 2**18 doubles (2 MB per temporary, cache-sized) ran 5-10x faster than one
# 4096 x 4096 block (128 MB) on 1536-3840 eigenvalues, with the same result.
KS_BLOCK_ELEMENTS = 2**18
# A pooled FARMS spectrum can hold hundreds of thousands of eigenvalues; scanning every one
# as xmin is O(n^2). Beyond this many candidates the scan tries this many, evenly spaced
# in rank (the KS distance of each is still exact over its whole tail).
FARMS_KS_CANDIDATES = 4096


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


def fit_ks(lam: np.ndarray, max_block: int = 4096, max_candidates: int | None = None) -> PowerLawFit:
    """Hill estimate at every candidate xmin; keep the smallest KS distance.

    Vectorised over candidates in blocks (an n x n comparison for n candidates),
    of at most KS_BLOCK_ELEMENTS comparisons (and at most ``max_block`` candidates), each
    starting at its first candidate's column, so the lower triangle is mostly skipped.
    ``max_candidates`` (None: all) thins the candidates to that many, evenly spaced
    in rank, for the very long pooled spectra of FARMS.
    """
    n_all = lam.size
    loglam = np.log(lam)
    # suffix sums of log lam give every candidate's Hill denominator at once
    suffix = np.cumsum(loglam[::-1])[::-1]
    idx = np.arange(n_all - 1)
    if max_candidates is not None and idx.size > max_candidates:
        idx = np.unique(np.round(np.linspace(0, n_all - 2, max_candidates)).astype(np.int64))
    max_block = max(1, min(max_block, KS_BLOCK_ELEMENTS // max(n_all, 1)))
    n_tail = (n_all - idx).astype(np.float64)
    denom = suffix[idx] - n_tail * loglam[idx]
    # a constant tail (lam_i == lam_max) has no power law; the suffix-sum difference would
    # leave a rounding residue there instead of the exact 0 and give alpha ~ 1e16
    flat = lam[idx] >= lam[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = np.where((denom > 0) & ~flat, 1.0 + n_tail / denom, np.nan)
    ds = np.full(idx.size, np.inf)
    for start in range(0, idx.size, max_block):
        stop = min(start + max_block, idx.size)
        cand = idx[start:stop]
        a = alphas[start:stop]
        # ratio[c, j] = lam_j / lam_c for j >= c; columns left of the block's first candidate are
        # below every row's diagonal and skipped, the rest of the lower triangle is masked out
        first = int(cand[0])
        ratio = lam[None, first:] / lam[cand, None]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            model = 1.0 - ratio ** (1.0 - a[:, None])
        k = np.arange(first, n_all)[None, :] - cand[:, None]
        emp = k / n_tail[start:stop, None]
        gap = np.abs(model - emp)
        gap[k < 0] = -np.inf
        d = gap.max(axis=1)
        d[~(a > 1)] = np.inf
        ds[start:stop] = d
    if not np.isfinite(ds).any():
        return PowerLawFit(alpha=float("nan"), xmin=float("nan"), ks_distance=float("nan"), n_tail=0)
    best = int(np.argmin(ds))
    at = int(idx[best])
    return PowerLawFit(alpha=float(alphas[best]), xmin=float(lam[at]), ks_distance=float(ds[best]), n_tail=n_all - at)


# -- FARMS: fixed-aspect-ratio submatrices ----------------------------------------------------


@dataclass(frozen=True)
class FarmsWindows:
    """Where the FARMS submatrices of one matrix shape lie: every (row_start, col_start) pair."""

    rows: int  # window height
    cols: int  # window width
    row_starts: tuple[int, ...]
    col_starts: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def covers(self, rows: int, cols: int) -> bool:
        """One window that is the whole matrix: the pooled spectrum is the matrix's own."""
        return self.count == 1 and (self.rows, self.cols) == (rows, cols)


def _starts(length: int, size: int, per_dim: int) -> tuple[int, ...]:
    span = length - size
    if span <= 0:
        return (0,)
    k = min(per_dim, span + 1)
    return tuple(int(v) for v in np.unique(np.round(np.linspace(0, span, k)).astype(np.int64)))


def farms_windows(rows: int, cols: int, window: int = 2000, aspect: float = 1.0, per_dim: int = 10) -> FarmsWindows:
    """The FARMS sliding windows of a rows x cols matrix.

    Each window is b x ceil(aspect * b) with its long side along the matrix's long side,
    b = min(window, short side, floor(long side / aspect)): every window then has the same
    aspect ratio whatever the matrix's, so the Marchenko-Pastur shape of its spectrum is the
    same for a square attention matrix and a 4:1 MLP matrix. Along each dimension the
    windows start at up to ``per_dim`` evenly spaced offsets from 0 to (length - size), so
    the first and last windows touch the matrix's edges (the grid of the FARMS reference
    code, which steps by floor(span / (per_dim - 1)) and may leave the last rows out).
    """
    if aspect < 1:
        raise ValueError(f"farms_aspect must be >= 1 (long side / short side of a window), got {aspect}")
    if window < 1 or per_dim < 1:
        raise ValueError(f"farms_window and farms_windows_per_dim must be >= 1, got {window} and {per_dim}")
    short, long_ = min(rows, cols), max(rows, cols)
    b = min(window, short, int(long_ // aspect))
    if b < 1:
        raise ValueError(f"a {rows} x {cols} matrix holds no window of aspect ratio {aspect}")
    wide = min(long_, int(np.ceil(aspect * b - 1e-9)))
    w_rows, w_cols = (wide, b) if rows >= cols else (b, wide)
    return FarmsWindows(w_rows, w_cols, _starts(rows, w_rows, per_dim), _starts(cols, w_cols, per_dim))


def pool_spectra(spectra: Sequence[np.ndarray]) -> np.ndarray:
    """The averaged ESD of FARMS: all windows' eigenvalues in one ascending array.

    An empirical spectral distribution puts mass 1/n on each of n eigenvalues; the
    average of K such distributions with the same n puts 1/(K n) on each of the K n
    eigenvalues together, so concatenating the windows' spectra *is* their average.
    """
    return np.sort(np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in spectra]))


def _coverage_counts(length: int, size: int, starts: tuple[int, ...]) -> np.ndarray:
    """How many windows of ``size`` starting at ``starts`` hold each of ``length`` positions."""
    m = np.zeros(length + 1)
    for s in starts:
        m[s] += 1
        m[min(s + size, length)] -= 1
    return np.cumsum(m)[:length]


def design_effect(win: FarmsWindows, rows: int, cols: int) -> float:
    """Kish's design effect of the FARMS windows' overlap: sum m^2 / sum m over the matrix's entries.

    m(i, j) = how many windows hold entry (i, j) (row count times column count). A pooled
    spectrum whose windows overlap counts the same weights several times; if each window's
    tail information is spread over its entries, the pooled tail holds as much information
    as n_tail / deff independent eigenvalues (Kish 1965, the effective sample size of a
    weighted sample). Non-overlapping windows and a matrix that is its own window give 1;
    MiniLM's 1536 x 384 MLP matrices (10 windows of 384 rows, 128 apart) give 2.73.
    """
    r = _coverage_counts(rows, win.rows, win.row_starts)
    c = _coverage_counts(cols, win.cols, win.col_starts)
    return float((r @ r) * (c @ c) / (r.sum() * c.sum()))
