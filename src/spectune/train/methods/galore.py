"""GaLore (Zhao et al., ICML 2024, arXiv:2403.03507): every weight trains; chosen matrices' gradients are projected.

Each targeted matrix's gradient is projected onto its top-r singular subspace
(recomputed every ``update_proj_gap`` steps), Adam's moments are kept in that r-wide
space and the update is projected back and scaled by ``scale``: the optimizer state of
an m x n matrix is 2 r max(m, n) elements instead of AdamW's 2 m n, a fraction
r / min(m, n). The optimizer is galore-torch's own ``GaLoreAdamW`` (the package
transformers' ``optim="galore_adamw"`` uses), given one parameter group per targeted
matrix: galore-torch reads ``rank`` per group, so per-matrix ranks need per-matrix
groups, and a rate plan's per-matrix rates ride on the same groups.

Without a plan every parameter trains and every target gets ``rank``; parameters
outside the targets (embeddings, norms, head) train with ordinary AdamW inside the same
optimizer, as in the paper and transformers. A rank plan (adaptive-rank, or its
size-matched layer-pattern control) is read as it is under LoRA: its matrices train,
each projected at its planned rank, the targets it leaves out stay frozen, and its
trainable set (none, for those two policies) decides which other analysed matrices
train in full, so the embeddings and the LM head are frozen as they are under a LoRA
rank plan; what the analysis does not cover (norms, biases, a new task head) trains.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from pydantic import Field

from spectune.plan import Plan, match_names
from spectune.train.methods.base import (RANKS, RATES, TRAINABLE, BuildContext, Method, TargetedBase,
                                         default_targets, train_planned_matrices)

RANKS_ATTR = "spectune_galore_ranks"  # parameter name -> projection rank, set by build, read by the optimizer hook


class GaloreConfig(TargetedBase):
    kind: Literal["galore"] = "galore"
    rank: int = Field(128, ge=1, description="projection rank r of every targeted matrix (a rank plan's ranks "
                      "replace it); the paper uses 128 for 60M, 256 for 350M and 512 for 1B models")
    update_proj_gap: int = Field(200, ge=1, description="T: steps between recomputing each projection (paper: 200)")
    scale: float = Field(4.0, gt=0, description="alpha: scale of the projected-back update; 4 as in GaLore's GLUE "
                         "fine-tuning runs (its repository's run_glue command), 0.25 in its pre-training runs")
    proj_type: Literal["std", "reverse_std", "left", "right"] = Field(
        "std", description="galore-torch's projection side; std projects the short side (the smaller state)")


def _selected(model: torch.nn.Module, cfg: GaloreConfig) -> list[str]:
    """Parameter names of the targeted modules' weights (PEFT's rule: a string is a full-match regex, a list
    names modules by their own name or dotted suffix)."""
    if cfg.target_modules is None:
        modules = default_targets(model)
    elif isinstance(cfg.target_modules, str):
        modules = [n for n, _ in model.named_modules() if re.fullmatch(cfg.target_modules, n)]
    else:
        wanted = tuple(cfg.target_modules)
        modules = [n for n, _ in model.named_modules() if n in wanted or n.endswith(tuple("." + w for w in wanted))]
    params = dict(model.named_parameters())
    names = [m + ".weight" for m in modules if m + ".weight" in params]
    if not names:
        raise ValueError(f"method.target_modules={cfg.target_modules!r} selects no module with a weight")
    return names


def projection_ranks(model: torch.nn.Module, cfg: GaloreConfig, plan: Plan | None) -> dict[str, int]:
    """Each projected matrix's rank by parameter name: the rank plan's where the run has one, else ``rank``."""
    params = dict(model.named_parameters())
    chosen = _selected(model, cfg)
    if plan is not None and plan.lora is not None:
        lora = plan.lora
        names = match_names([t + ".weight" for t in lora.target_modules], list(params))
        ranks = {names[t + ".weight"]: lora.rank_pattern.get(t, lora.r) for t in lora.target_modules}
        where = "the rank plan (plan.params.max_rank)"
    else:
        ranks = {n: cfg.rank for n in chosen}
        where = "method.rank"
    for n, r in ranks.items():
        p = params[n]
        if p.ndim != 2:
            raise ValueError(f"method.target_modules selects {n}, a {p.ndim}-D parameter; GaLore projects matrices")
        if r > min(p.shape):
            raise ValueError(f"{where} gives {n} rank {r}, above its short side {min(p.shape)} "
                             f"({p.shape[0]} x {p.shape[1]}); GaLore projects onto at most that many directions")
    return ranks


def build(model: torch.nn.Module, cfg: GaloreConfig, ctx: BuildContext) -> torch.nn.Module:
    """Every parameter trainable, less what the plan's trainable set freezes; a rank plan's matrices train through
    their projections and the kind's other targets stay frozen. The ranks are recorded on the model for the
    optimizer hook (which is given the model and its groups, not the plan)."""
    plan = ctx.plan
    model.requires_grad_(True)
    if plan is not None and plan.trainable is not None:
        train_planned_matrices(model, plan)
    ranks = projection_ranks(model, cfg, plan)
    params = dict(model.named_parameters())
    if plan is not None and plan.lora is not None:
        for n in _selected(model, cfg):
            params[n].requires_grad_(False)
        for n in ranks:
            params[n].requires_grad_(True)
    setattr(model, RANKS_ATTR, {n: r for n, r in ranks.items() if params[n].requires_grad})
    return model


def galore_groups(model: torch.nn.Module, groups: list[dict[str, Any]], cfg: GaloreConfig) -> list[dict[str, Any]]:
    """The run's groups with each projected matrix in a group of its own carrying galore-torch's keys."""
    ranks = getattr(model, RANKS_ATTR, None)
    if ranks is None:
        raise ValueError("method.kind=galore: the model was not built by the galore kind (no projection ranks)")
    rank_of = {id(p): ranks[n] for n, p in model.named_parameters() if n in ranks}
    out: list[dict[str, Any]] = []
    for g in groups:
        plain = [p for p in g["params"] if id(p) not in rank_of]
        if plain:
            out.append({**g, "params": plain})
        out += [{**g, "params": [p], "rank": rank_of[id(p)], "update_proj_gap": cfg.update_proj_gap,
                 "scale": cfg.scale, "proj_type": cfg.proj_type} for p in g["params"] if id(p) in rank_of]
    return out


def optimizer(model: torch.nn.Module, groups: list[dict[str, Any]], lr: float, kwargs: dict[str, Any],
              cfg: GaloreConfig) -> torch.optim.Optimizer:
    """galore-torch's GaLoreAdamW over the run's groups (Adam's betas and eps from the Trainer's arguments)."""
    from galore_torch import GaLoreAdamW

    if any(type(p).__name__ == "DTensor" for g in groups for p in g["params"]):
        raise ValueError("method.kind=galore projects whole gradients; train.distributed: fsdp shards them (use ddp)")
    return GaLoreAdamW(galore_groups(model, groups, cfg), lr=lr, betas=kwargs.get("betas", (0.9, 0.999)),
                       eps=kwargs.get("eps", 1e-6), no_deprecation_warning=True)


METHOD = Method(kind="galore", config=GaloreConfig, build=build, plan_sets=frozenset({RATES, RANKS, TRAINABLE}),
                trains="every parameter, targeted matrices through rank-r gradient projections",
                memory="weights + full gradients + AdamW state of r/min(m,n) of each targeted matrix",
                paper="arXiv:2403.03507", library="galore_torch.GaLoreAdamW", mergeable=True, optimizer=optimizer)
