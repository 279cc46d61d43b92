"""The controlled intervention: change a matrix's eigenvalue ratio and nothing else that matters.

``W = U diag(s) V^T``; the top-k singular values are multiplied by ``factor`` and the
whole spectrum is then rescaled so ``||s'||_2 = ||s||_2``. The singular vectors and the
Frobenius norm (hence the overall scale the next layer sees) are unchanged, so a
difference in fine-tuning outcome can be put down to the spectrum's shape: the top
eigenvalue ratio ``s_1^2 / sum s^2`` goes up for factor > 1 (stable rank down) and
down for factor < 1.
"""

from __future__ import annotations

import math

import torch


def rescaled_spectrum(s: torch.Tensor, factor: float, k: int = 1) -> torch.Tensor:
    """The new singular values (same order as ``s``, descending in): top k times ``factor``, same 2-norm."""
    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    if not 1 <= k <= s.numel():
        raise ValueError(f"k must be in [1, {s.numel()}], got {k}")
    out = s.clone()
    out[:k] = out[:k] * factor
    norm = torch.linalg.vector_norm(out)
    return out * (torch.linalg.vector_norm(s) / norm) if norm > 0 else out


def rescale_top_singular_values(w: torch.Tensor, factor: float, k: int = 1) -> torch.Tensor:
    """``w`` with its top-k singular values scaled by ``factor`` and the Frobenius norm kept (a new tensor).

    Computed in float64 and cast back, so the only change beyond float32 rounding is
    the intended one. ``factor == 1`` returns an unchanged copy (no SVD round trip).
    """
    if w.ndim != 2:
        raise ValueError(f"a matrix is needed, got shape {tuple(w.shape)}")
    if factor == 1:
        return w.detach().clone()
    u, s, vh = torch.linalg.svd(w.detach().to(torch.float64), full_matrices=False)
    s2 = rescaled_spectrum(s, factor, k)
    return ((u * s2) @ vh).to(w.dtype)


def top_eig_ratio(s: torch.Tensor) -> float:
    """``max s^2 / sum s^2`` (the top eigenvalue of W^T W over the trace)."""
    sq = s.to(torch.float64) ** 2
    return float(sq.max() / sq.sum())


def stable_rank(s: torch.Tensor) -> float:
    """``sum s^2 / max s^2 = ||W||_F^2 / ||W||_2^2``."""
    return 1.0 / top_eig_ratio(s)


def factor_for_top_ratio(s: torch.Tensor, target: float) -> float:
    """The k=1 factor that moves the top eigenvalue ratio to ``target`` (closed form).

    With ``R = sum_{i>1} s_i^2``: ``f^2 s_1^2 / (f^2 s_1^2 + R) = target`` gives
    ``f = sqrt(target R / ((1 - target) s_1^2))``; valid while the scaled value stays
    the largest (``f s_1 >= s_2``), which the caller can check with ``top_eig_ratio``.
    """
    if not 0 < target < 1:
        raise ValueError("target ratio must be in (0, 1)")
    sq = s.to(torch.float64) ** 2
    rest = float(sq[1:].sum())
    return math.sqrt(target * rest / ((1 - target) * float(sq[0])))
