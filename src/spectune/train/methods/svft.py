"""SVFT (Lingam et al., NeurIPS 2024, arXiv:2405.19597): fine-tuning in each weight's own singular basis.

Each targeted weight W = U S V^T (out x in) stays frozen, and so do its singular
vectors; what trains is a sparse r x r matrix M of coefficients of their outer
products, the update being delta W = U M V^T = sum over (i, j) in the pattern of
M_ij u_i v_j^T. The paper's patterns for M (``pattern``):

- ``plain``: the diagonal (M_ii rescales the i-th singular direction; r coefficients);
- ``banded``: the diagonal and ``off_diag`` = d diagonals on each side of it
  (n(2d + 1) - d(d + 1) coefficients, n = r);
- ``random``: as many coefficients as banded-d, at positions drawn uniformly without
  repeats (seeded by the run's seed);
- ``top_k``: as many as banded-d, at the k pairs (i, j) whose singular vectors align
  most, |u_i . v_j| (only where W is square: u_i has out entries and v_j has in).

``r`` keeps only the top r singular triplets for the update (the paper's rank
truncation, which bounds memory: U and V cost r(out + in) a matrix); the frozen W itself
is kept whole, so the model starts exactly as the base. M starts at zero (the
reference code starts it at small random values behind a sigmoid gate at 0.5; zero
keeps the start identical to the base model, as LoRA's B = 0 does).

No library has it, so it is written here as a module wrapper: each target becomes an
``SvftLayer`` holding the original layer as ``base_layer`` (the name PEFT uses, so plans
match it) and M's nonzero entries as the parameter ``svft_m``, which takes the plan's
rate of the layer it adapts. At the end of training every layer is merged (W + U M V^T,
``merge``), so final/ is a plain model folder that transformers loads; checkpoints keep
the wrapper for ``--resume``. One size per matrix, so a rank plan is refused.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from transformers import TrainerCallback

from spectune.train.methods._peft import WEIGHT_SETS
from spectune.train.methods.base import BuildContext, Method, TargetedBase, targets, train_planned_matrices

Pattern = Literal["plain", "banded", "random", "top_k"]


class SvftConfig(TargetedBase):
    kind: Literal["svft"] = "svft"
    pattern: Pattern = Field("plain", description="where M has trainable entries: plain (diagonal), banded, random, "
                             "top_k (the best-aligned singular-vector pairs; square weights only)")
    off_diag: int = Field(0, ge=0, description="d: banded's diagonals each side of the main one; random and top_k "
                          "train as many entries as banded-d does")
    r: int | None = Field(None, ge=1, description="top singular triplets the update uses (None: all min(out, in))")

    @model_validator(mode="after")
    def _plain(self) -> "SvftConfig":
        if self.pattern == "plain" and self.off_diag:
            raise ValueError(f"method.off_diag={self.off_diag} with pattern plain: plain is the diagonal alone; use "
                             "pattern banded (or random, top_k) for off-diagonal coefficients")
        return self


def coefficient_count(n: int, d: int) -> int:
    """Entries of an n x n band of half-width d: n(2d + 1) - d(d + 1) (all n^2 once the band covers M)."""
    return n * n if d >= n - 1 else n * (2 * d + 1) - d * (d + 1)


def positions(pattern: str, n: int, d: int, u: torch.Tensor, vh: torch.Tensor,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of M's trainable entries in row-major order, for the truncated singular vectors u (out x n)
    and vh (n x in)."""
    if pattern in ("plain", "banded"):
        i = torch.arange(n)
        return torch.nonzero((i[:, None] - i[None, :]).abs() <= d, as_tuple=True)
    k = coefficient_count(n, d)
    if pattern == "random":
        flat = torch.randperm(n * n, generator=generator)[:k]
    else:
        if u.shape[0] != vh.shape[1]:
            raise ValueError(f"method.pattern=top_k aligns u_i with v_j, which needs a square weight; this one is "
                             f"{u.shape[0]} x {vh.shape[1]}: target square layers or use pattern banded or random")
        flat = torch.topk((u.T.float() @ vh.T.float()).abs().flatten(), k).indices
    flat = flat.sort().values
    return flat // n, flat % n


def _conv1d() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D

        return (Conv1D,)
    except ImportError:  # pragma: no cover
        return ()


def weight_matrix(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's weight as out x in (GPT-2's Conv1D stores it in x out)."""
    return layer.weight.t() if isinstance(layer, _conv1d()) else layer.weight


class SvftLayer(torch.nn.Module):
    """A frozen linear layer plus U M V^T, M sparse with its nonzero entries ``svft_m`` at (rows, cols)."""

    def __init__(self, base: torch.nn.Module, u: torch.Tensor, vh: torch.Tensor, rows: torch.Tensor,
                 cols: torch.Tensor) -> None:
        super().__init__()
        self.base_layer = base
        self.register_buffer("svft_u", u.contiguous())
        self.register_buffer("svft_vh", vh.contiguous())
        self.register_buffer("svft_rows", rows)
        self.register_buffer("svft_cols", cols)
        self.svft_m = torch.nn.Parameter(torch.zeros(rows.numel(), dtype=torch.float32, device=u.device))

    def coefficients(self) -> torch.Tensor:
        """M as a dense r x r matrix (zero outside the pattern)."""
        n = self.svft_u.shape[1]
        return self.svft_m.new_zeros(n, n).index_put((self.svft_rows, self.svft_cols), self.svft_m)

    def delta_weight(self) -> torch.Tensor:
        """U M V^T (out x in), in float32."""
        return self.svft_u.float() @ self.coefficients() @ self.svft_vh.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        dtype = self.svft_u.dtype
        h = (x.to(dtype) @ self.svft_vh.T) @ self.coefficients().to(dtype).T @ self.svft_u.T
        return y + h.to(y.dtype)


def svft_layer(base: torch.nn.Module, cfg: SvftConfig, generator: torch.Generator) -> SvftLayer:
    """``base`` wrapped: its weight's SVD (float32, then the weight's dtype) truncated to ``cfg.r``, M's pattern."""
    w = weight_matrix(base).detach()
    u, _, vh = torch.linalg.svd(w.float(), full_matrices=False)
    n = min(cfg.r or u.shape[1], u.shape[1])
    u, vh = u[:, :n], vh[:n]
    rows, cols = positions(cfg.pattern, n, cfg.off_diag, u, vh, generator)
    return SvftLayer(base, u.to(w.dtype), vh.to(w.dtype), rows.to(w.device), cols.to(w.device))


def target_names(model: torch.nn.Module, spec: list[str] | str) -> list[str]:
    """Linear (and Conv1D) modules named by ``spec``, read as PEFT reads target_modules: a string is a full-name
    regex, a list holds exact names or name suffixes."""
    kinds = (torch.nn.Linear, *_conv1d())
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        hit = (re.fullmatch(spec, name) is not None if isinstance(spec, str)
               else any(name == t or name.endswith("." + t) for t in spec))
        if hit:
            out.append(name)
    return out


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def build(model: torch.nn.Module, cfg: SvftConfig, ctx: BuildContext) -> torch.nn.Module:
    names = target_names(model, targets(model, cfg))
    if not names:
        raise ValueError(f"method.target_modules={cfg.target_modules!r} matches no linear layer of the model")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(ctx.seed)
    for name in names:
        _replace(model, name, svft_layer(model.get_submodule(name), cfg, generator))
    for n, p in model.named_parameters():
        if n.split(".")[0] in ctx.heads:
            p.requires_grad_(True)
    if ctx.plan is not None and ctx.plan.trainable is not None:
        train_planned_matrices(model, ctx.plan)
    return model


def merge(model: torch.nn.Module) -> torch.nn.Module:
    """Every ``SvftLayer`` replaced by its base layer with W + U M V^T as its weight (frozen); the model, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SvftLayer):
            base = module.base_layer
            with torch.no_grad():
                delta = module.delta_weight()
                base.weight.add_((delta.t() if isinstance(base, _conv1d()) else delta).to(base.weight.dtype))
            _replace(model, name, base)
    return model


class MergeAtTrainEnd(TrainerCallback):
    """Merges the SVFT layers when training ends, so the evaluation and final/ see one plain model."""

    def on_train_end(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                     **kwargs: Any) -> None:
        if model is not None:
            merge(model)


METHOD = Method(kind="svft", config=SvftConfig, build=build, plan_sets=WEIGHT_SETS,
                trains="coefficients of singular-vector outer products", paper="arXiv:2405.19597",
                library="spectune (module wrapper)", mergeable=True, callbacks=lambda cfg, ctx: [MergeAtTrainEnd()],
                memory="frozen weights + U, V (r(out + in) a matrix: a second copy at full rank) + M's entries")
