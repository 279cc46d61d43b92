"""Per-matrix metrics derived from one spectrum.

Everything here is a pure function of the eigenvalues ``lam`` of W^T W (the
squared singular values, ascending) and the matrix shape, so one eigenvalue
computation feeds every metric. Definitions and sources: docs/metrics.md.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from spectune.analyze import marchenko_pastur, tailfit

# Eigenvalues at or below this are treated as zero when fitting power laws
# (WeightWatcher's EVALS_THRESH, kept so the alpha cross-check compares like with like).
EVALS_THRESH = 1e-5
# Single-precision weights: singular values below s_max * max(N, M) * eps32 are numerically zero
# (numpy.linalg.matrix_rank's rule at float32 precision; WeightWatcher applies it at float64
# precision to upcast weights, so it can count one more rank on nearly singular matrices).
RANK_EPS = float(np.finfo(np.float32).eps)


def numerical_rank(s: np.ndarray, rows: int, cols: int) -> int:
    if s.size == 0 or s[-1] <= 0:
        return 0
    return int(np.count_nonzero(s > s[-1] * max(rows, cols) * RANK_EPS))


def norm_metrics(lam: np.ndarray, rows: int, cols: int) -> dict[str, float]:
    """Norms, ranks and entropies: exact for any non-zero matrix, however small."""
    s = np.sqrt(lam)
    total = float(lam.sum())
    lmax = float(lam[-1])
    rank = numerical_rank(s, rows, cols)
    p = lam[lam > 0] / total
    h = float(-(p * np.log(p)).sum())
    s_desc = s[::-1]
    ps = s_desc / s_desc.sum()
    n = s.size
    return {
        "n_evals": n,
        "frobenius_norm": math.sqrt(total),
        "spectral_norm": math.sqrt(lmax),
        "stable_rank": total / lmax,
        "top_eig_ratio": lmax / total,
        "numerical_rank": rank,
        "spectral_entropy": h / math.log(rank) if rank > 1 else 0.0,
        "effective_rank": math.exp(h),
        "log_norm": math.log10(total),
        "log_spectral_norm": math.log10(lmax),
        # a numerically singular matrix is infinitely ill-conditioned whichever route gave s_min
        "condition_number": float(s[-1] / s[0]) if rank == n else math.inf,
        # seed 000, read as in seed-notes: rank-weighted share of the singular-value mass
        "svd_metric": float((np.arange(1, n + 1) / n * ps).sum()),
        "mean_singular_value": float(s.mean()),
    }


def tail_metrics(
    lam: np.ndarray,
    rows: int,
    cols: int,
    tw_margin: bool = True,
    tail_lam: np.ndarray | None = None,
    max_candidates: int | None = None,
    fits: tuple[dict[str, tailfit.TailFits], int] | None = None,
    uncertainty: tailfit.Uncertainty | None = None,
) -> dict[str, float]:
    """Power-law and random-matrix fits; need enough eigenvalues to mean anything.

    ``tail_lam`` (ascending) is the spectrum the power-law fits read when it is not the
    matrix's own: the pooled window spectrum of the FARMS estimator. The alpha-derived
    norms (alpha_weighted, log_alpha_norm) and the Marchenko-Pastur fit still use the
    matrix's own eigenvalues: only the exponent changes with the estimator. ``fits``
    (the batched fits of ``tailfit.fit_tails`` and this matrix's row in them) saves
    fitting here; without it this matrix alone is fitted on the CPU.
    """
    if fits is None:
        src = lam if tail_lam is None else tail_lam
        fit_lam = src[src > EVALS_THRESH]
        fits = (tailfit.fit_tails([fit_lam], torch.device("cpu"), uncertainty or tailfit.Uncertainty(),
                                  max_candidates=max_candidates), 0) if fit_lam.size >= 2 else None
    out = power_law_columns(fits, lam)
    mp = marchenko_pastur.fit_mp(lam, rows, cols, tw_margin=tw_margin)
    out["mp_sigma"] = mp.sigma
    out["mp_bulk_max"] = mp.bulk_max
    out["num_spikes"] = mp.num_spikes
    out["mp_softrank"] = mp.softrank
    out["snr"] = spectrum_snr(np.sqrt(lam), rows, cols)
    return out


# the fitted columns of each xmin rule: (rule, column prefix)
FIT_COLUMNS = (("median", "alpha_hill"), ("ks", "alpha"))


def power_law_columns(fits: tuple[dict[str, tailfit.TailFits], int] | None, lam: np.ndarray) -> dict[str, Any]:
    """The alpha columns of one matrix from its row of the batched fits (NaN, no flags, without fits).

    Per rule: alpha, its se and 95% interval [lo, hi], n_tail, xmin and flags; the KS fit
    also gives alpha_ks_distance, alpha_weighted and log_alpha_norm (on ``lam``, the
    matrix's own spectrum).
    """
    out: dict[str, Any] = {}
    for rule, col in FIT_COLUMNS:
        if fits is None:
            values = dict.fromkeys(("", "_se", "_lo", "_hi", "_xmin"), math.nan)
            values.update({"_n_tail": 0, "_flags": tailfit.flag_names(tailfit.FLAG_BITS["degenerate"])})
        else:
            f, i = fits[0][rule], fits[1]
            values = {"": f.alpha[i], "_se": f.se[i], "_lo": f.lo[i], "_hi": f.hi[i], "_xmin": f.xmin[i],
                      "_n_tail": int(f.n_tail[i]), "_flags": f.flag_text(i)}
            if rule == "ks":
                out["alpha_ks_distance"] = float(f.ks_distance[i])
        for suffix, v in values.items():
            out[col + suffix] = v if isinstance(v, str) else float(v) if suffix != "_n_tail" else v
    out.setdefault("alpha_ks_distance", math.nan)
    alpha = out["alpha"]
    out["alpha_weighted"] = alpha * math.log10(float(lam[-1]))
    out["log_alpha_norm"] = log_alpha_norm(lam, alpha)
    return out


def log_alpha_norm(lam: np.ndarray, alpha: float) -> float:
    """log10 sum lam^alpha, summed in log space (lam^alpha overflows for large alpha)."""
    from scipy.special import logsumexp

    pos = lam[lam > 0]
    if not np.isfinite(alpha) or pos.size == 0:
        return math.nan
    return float(logsumexp(alpha * np.log(pos)) / math.log(10))


def spectrum_snr(s: np.ndarray, rows: int, cols: int) -> float:
    """Signal-to-noise ratio as the Spectrum layer-selection tool computes it.

    sigma_hat = IQR(s) / 1.349 (a Gaussian's IQR in sigmas), threshold
    sigma_hat (1 + sqrt(beta)) with beta = min/max dimension, then
    (sum of s above / sum of s below) / s_max.
    """
    q25, q75 = np.quantile(s, [0.25, 0.75])
    sigma_hat = (q75 - q25) / 1.349
    beta = min(rows, cols) / max(rows, cols)
    thr = sigma_hat * (1 + math.sqrt(beta))
    signal = float(s[s > thr].sum())
    noise = float(s[s <= thr].sum())
    if noise == 0:
        return math.inf
    return signal / noise / float(s[-1])


def esd_distance(lam_a: np.ndarray, lam_b: np.ndarray, bins: int = 100) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two spectra's log10-eigenvalue histograms."""
    from scipy.spatial.distance import jensenshannon

    a = np.log10(lam_a[lam_a > 0])
    b = np.log10(lam_b[lam_b > 0])
    if a.size == 0 or b.size == 0:
        return math.nan
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    if hi <= lo:
        return 0.0
    ha, _ = np.histogram(a, bins=bins, range=(lo, hi))
    hb, _ = np.histogram(b, bins=bins, range=(lo, hi))
    return float(jensenshannon(ha, hb, base=2))
