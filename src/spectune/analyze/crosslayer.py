"""Cross-layer metrics of seed 000: how a matrix relates to the rest of the model.

- ``cs_metric``: mean cosine similarity of the flattened matrix with every other
  matrix of the same shape (cosine only exists between equal-length vectors; the
  same-shape group, e.g. all q_proj, is the natural comparison set).
- ``ce_metric`` (default ``histogram`` mode): mean cross-entropy
  H(p_l, p_i) = -sum_j p_l(j) log(p_i(j) + eps) between this matrix's weight-value
  distribution and every other matrix's. Values are divided by the matrix's RMS and
  binned on one shared grid, so the distribution is defined for every pair of
  layers whatever their shapes, and (like the seed's |w| / sum |w|) it does not
  change when a matrix is rescaled.
- ``ce_metric`` in ``elementwise`` mode: the seed's literal reading, p = |w| / sum |w|
  over element positions, between same-shape matrices only.
"""

from __future__ import annotations

import numpy as np
import torch

CE_EPS = 1e-10  # the seed's constant against log(0)
HIST_RANGE = 8.0  # grid spans +-8 RMS; values beyond fall in the edge bins
HIST_SLICE = 1 << 22  # elements histogrammed at once


def value_histogram(w: torch.Tensor, bins: int = 256, rms: float | None = None) -> np.ndarray:
    """Probability histogram of w / rms(w) on the shared grid [-HIST_RANGE, HIST_RANGE].

    ``rms`` can be passed in (the engine knows it from the spectrum: sum lambda = ||W||_F^2),
    which saves a float64 copy of a large matrix.
    """
    return value_histograms([w], bins, None if rms is None else [rms])[0]


def value_histograms(mats: list[torch.Tensor], bins: int = 256, rms: list[float] | None = None) -> list[np.ndarray]:
    """``value_histogram`` of each matrix, counted in torch on the device the matrices are on.

    Values beyond the grid are clamped into the edge bins and counted by the same
    ``histc`` pass (``histc`` alone would drop them); counts are exact integers, so the
    probabilities equal those of a per-value numpy histogram with the same edge rule.
    Slices of HIST_SLICE elements bound the temporaries (an embedding would double the
    analysis' memory otherwise).
    """
    out = []
    for k, w in enumerate(mats):
        x = w.reshape(-1)
        if not x.dtype.is_floating_point or x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        r = rms[k] if rms is not None else float(torch.linalg.vector_norm(x, dtype=torch.float64)) / x.numel() ** 0.5
        lo, hi = -HIST_RANGE * r, HIST_RANGE * r
        h = torch.zeros(bins, dtype=torch.float64, device=x.device)
        for start in range(0, x.numel(), HIST_SLICE):
            part = x[start : start + HIST_SLICE]
            h += torch.histc(part.clamp(lo, hi), bins=bins, min=lo, max=hi).double()
        h = h.cpu().numpy()
        out.append(h / h.sum())
    return out


def cross_entropy_matrix(p: np.ndarray, eps: float = CE_EPS) -> np.ndarray:
    """H[l, i] = -sum_j p[l, j] log(p[i, j] + eps) for rows of probability vectors."""
    return -(p @ np.log(p + eps).T)


def mean_off_diagonal(m: np.ndarray) -> np.ndarray:
    """Row means over the other columns, skipping NaN (partners left out); NaN if none remain."""
    off = m.astype(np.float64, copy=True)
    np.fill_diagonal(off, np.nan)
    valid = np.isfinite(off)
    count = valid.sum(axis=1)
    total = np.where(valid, off, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def cosine_from_dots(dots: np.ndarray) -> np.ndarray:
    """Cosine similarity matrix from a matrix of inner products (diagonal = squared norms)."""
    norms = np.sqrt(np.diag(dots))
    return dots / np.outer(norms, norms)
