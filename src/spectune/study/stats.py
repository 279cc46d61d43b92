"""Intervals and the claim rule: one place, so every table and the docs use the same statistics.

A claim is decided by an interval, never by a point estimate: with the few cells a
CPU study can afford, most point estimates have the "right" sign by chance half of
the time, and only an interval says whether the data could tell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
from scipy import stats

from spectune.compare import stats as compare_stats

Direction = Literal["positive", "negative", "nonzero"]
Verdict = Literal["supported", "not supported", "inconclusive", "not evaluated"]
MIN_POINTS = 4  # below this a correlation or mean interval is not worth reporting as evidence


@dataclass(frozen=True)
class Estimate:
    """A number with its interval and the count behind it (``lo``/``hi`` NaN when undefined)."""

    value: float
    lo: float
    hi: float
    n: int
    method: str

    def as_dict(self, prefix: str = "") -> dict[str, float | int | str]:
        return {f"{prefix}estimate": self.value, f"{prefix}lo": self.lo, f"{prefix}hi": self.hi,
                f"{prefix}n": self.n, f"{prefix}interval": self.method}


NAN = float("nan")


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> Estimate:
    """Mean and Student-t interval; why t: a handful of seeds, normal-ish metric noise."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    mean, lo, hi = compare_stats.t_interval(x, confidence)
    return Estimate(mean, lo, hi, int(x.size), "t")


def spearman_interval(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray,
                      confidence: float = 0.95) -> Estimate:
    """Spearman's rho with a Fisher-z interval using the Fieller-Hartley-Pearson variance 1.06/(n-3).

    Deterministic (no resampling), so the same cells always give the same verdict;
    defined for n >= 4.
    """
    a = np.asarray(x, dtype=float)
    b = np.asarray(y, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    n = int(a.size)
    if n < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return Estimate(NAN, NAN, NAN, n, "spearman-fisher")
    rho = float(stats.spearmanr(a, b).statistic)
    if n < MIN_POINTS:
        return Estimate(rho, NAN, NAN, n, "spearman-fisher")
    z = math.atanh(max(min(rho, 0.999999), -0.999999))
    se = math.sqrt(1.06 / (n - 3))
    q = float(stats.norm.ppf(0.5 + confidence / 2))
    return Estimate(rho, math.tanh(z - q * se), math.tanh(z + q * se), n, "spearman-fisher")


def verdict(est: Estimate, direction: Direction, null: float = 0.0) -> Verdict:
    """The claim rule (docs/studies.md): the interval decides.

    - ``positive``/``negative``: supported when the whole interval lies on the claimed side
      of ``null``, not supported when it lies wholly on the other side, else inconclusive.
    - ``nonzero`` (a claim of *some* difference): supported when the interval excludes
      ``null``; otherwise inconclusive (an interval around ``null`` cannot prove "no
      difference" without an equivalence margin, which the seed does not give).
    - no interval (too few points): inconclusive.
    """
    lo, hi = est.lo, est.hi
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "inconclusive"
    above, below = lo > null, hi < null
    if direction == "nonzero":
        return "supported" if above or below else "inconclusive"
    if direction == "positive":
        return "supported" if above else "not supported" if below else "inconclusive"
    return "supported" if below else "not supported" if above else "inconclusive"


def ols_coefficient(design: np.ndarray, y: np.ndarray, index: int, confidence: float = 0.95) -> Estimate:
    """One least-squares coefficient with its t-interval (df = n - p), from individual cells.

    Used for dose-response shapes: the cells themselves are the data, so the interval
    reflects seed noise honestly even with two seeds per dose (a bootstrap within
    two-seed groups would not).
    """
    x = np.asarray(design, dtype=float)
    yy = np.asarray(y, dtype=float)
    keep = np.isfinite(yy) & np.isfinite(x).all(axis=1)
    x, yy = x[keep], yy[keep]
    n, p = x.shape
    if n <= p or np.linalg.matrix_rank(x) < p:
        beta = np.linalg.lstsq(x, yy, rcond=None)[0] if n else np.full(p, NAN)
        return Estimate(float(beta[index]) if n else NAN, NAN, NAN, n, "ols-t")
    beta, *_ = np.linalg.lstsq(x, yy, rcond=None)
    resid = yy - x @ beta
    sigma2 = float(resid @ resid) / (n - p)
    cov = sigma2 * np.linalg.inv(x.T @ x)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - p) * math.sqrt(cov[index, index]))
    b = float(beta[index])
    return Estimate(b, b - half, b + half, n, "ols-t")
