"""Loss-landscape smoothness at a point: random-perturbation sharpness and the top Hessian eigenvalue.

Both are pure functions of ``(model, batches, loss_fn)``: the model's weights are
restored exactly on return, the model is put in eval mode (no dropout, so the loss is
a deterministic function of the weights), and the same fixed batches are used for every
evaluation, so two models can be compared on the same function.

- ``perturbation_sharpness``: ``E[L(w + d) - L(w)]`` over random directions ``d``: for
  each matrix a Gaussian direction scaled to ``rel_size * ||W||_F`` (per-matrix, so a
  large embedding does not take the whole budget; the filter-normalisation idea of Li
  et al. 2018 "Visualizing the Loss Landscape of Neural Nets" at matrix granularity).
- ``hessian_top_eigenvalue``: power iteration on Hessian-vector products (Pearlmutter's
  trick: the gradient of ``<grad L, v>``), i.e. the curvature along the sharpest
  direction, as in Keskar et al. 2017 and Yao et al. 2020 (PyHessian).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from typing import Any, Iterator

import torch

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def hf_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss a Hugging Face model computes itself from a batch with labels."""
    return model(**batch).loss


def select_params(model: torch.nn.Module, names: Iterable[str] | None = None,
                  min_ndim: int = 2) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters a measure acts on: the named ones, or every matrix (ndim >= ``min_ndim``)."""
    wanted = set(names) if names is not None else None
    out = [(n, p) for n, p in model.named_parameters()
           if (n in wanted if wanted is not None else p.ndim >= min_ndim)]
    if not out:
        raise ValueError("no parameters selected")
    return out


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def mean_loss(model: torch.nn.Module, batches: Sequence[Any], loss_fn: LossFn = hf_loss) -> float:
    """The loss averaged over the fixed batches (each batch weighs the same)."""
    with torch.no_grad(), _eval_mode(model):
        return float(sum(float(loss_fn(model, b)) for b in batches) / len(batches))


def perturbation_sharpness(model: torch.nn.Module, batches: Sequence[Any], loss_fn: LossFn = hf_loss,
                           rel_size: float = 0.01, draws: int = 5, params: Iterable[str] | None = None,
                           seed: int = 0) -> dict[str, Any]:
    """Mean loss increase under random per-matrix perturbations of relative size ``rel_size``.

    Each draw adds ``rel_size * ||W|| * g / ||g||`` (``g`` standard Gaussian) to every selected
    matrix at once, evaluates the loss on ``batches`` and restores the weights. Returns the
    base loss, the mean and standard deviation of the increase, and each draw's increase.
    """
    chosen = select_params(model, params)
    gen = torch.Generator().manual_seed(seed)
    base = mean_loss(model, batches, loss_fn)
    saved = [p.detach().clone() for _, p in chosen]
    increases: list[float] = []
    try:
        for _ in range(draws):
            with torch.no_grad():
                for (_, p), w in zip(chosen, saved):
                    g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                    step = g * (rel_size * float(torch.linalg.vector_norm(w.double())) / float(torch.linalg.vector_norm(g)))
                    p.copy_(w + step.to(p.dtype))
            increases.append(mean_loss(model, batches, loss_fn) - base)
    finally:
        with torch.no_grad():
            for (_, p), w in zip(chosen, saved):
                p.copy_(w)
    t = torch.tensor(increases, dtype=torch.float64)
    return {"base_loss": base, "mean_increase": float(t.mean()),
            "std_increase": float(t.std()) if len(increases) > 1 else 0.0, "increases": increases,
            "rel_size": rel_size, "draws": draws, "n_params": sum(p.numel() for _, p in chosen)}


def hessian_vector_product(model: torch.nn.Module, batches: Sequence[Any], loss_fn: LossFn,
                           params: list[torch.nn.Parameter], vec: list[torch.Tensor]) -> list[torch.Tensor]:
    """``H v`` of the batch-averaged loss by double backward, one batch at a time (memory of one batch)."""
    out = [torch.zeros_like(p) for p in params]
    for b in batches:
        loss = loss_fn(model, b) / len(batches)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vec))
        hv = torch.autograd.grad(dot, params)
        for o, h in zip(out, hv):
            o.add_(h.detach())
    return out


def hessian_top_eigenvalue(model: torch.nn.Module, batches: Sequence[Any], loss_fn: LossFn = hf_loss,
                           params: Iterable[str] | None = None, iters: int = 20, tol: float = 1e-3,
                           seed: int = 0) -> dict[str, Any]:
    """The Hessian eigenvalue of largest magnitude by power iteration on Hessian-vector products.

    Iterates ``v <- Hv / ||Hv||`` from a seeded Gaussian start; the estimate is the Rayleigh
    quotient ``v^T H v``; stops when it changes by less than ``tol`` (relative) or after
    ``iters`` products. Near a minimum the dominant eigenvalue is the top (positive) one;
    a negative value says the point is a saddle along that direction.
    """
    chosen = [p for _, p in select_params(model, params)]
    flags = [p.requires_grad for p in chosen]
    gen = torch.Generator().manual_seed(seed)
    vec = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in chosen]
    history: list[float] = []
    converged = False
    with _eval_mode(model):
        try:
            for p in chosen:
                p.requires_grad_(True)
            norm = math.sqrt(sum(float((v * v).sum()) for v in vec))
            vec = [v / norm for v in vec]
            for _ in range(iters):
                hv = hessian_vector_product(model, batches, loss_fn, chosen, vec)
                rayleigh = sum(float((h * v).sum()) for h, v in zip(hv, vec))
                history.append(rayleigh)
                norm = math.sqrt(sum(float((h * h).sum()) for h in hv))
                if norm == 0:
                    converged = True
                    break
                vec = [h / norm for h in hv]
                if len(history) > 1 and abs(history[-1] - history[-2]) <= tol * max(abs(history[-1]), 1e-12):
                    converged = True
                    break
        finally:
            for p, f in zip(chosen, flags):
                p.requires_grad_(f)
            model.zero_grad(set_to_none=True)
    return {"eigenvalue": history[-1] if history else math.nan, "iterations": len(history),
            "converged": converged, "history": history}
