"""``layer-pattern``: LoRA ranks fixed by depth, reading no spectrum (the control for spectral ranks).

A rank policy earns its keep only if it beats ranks that ignore the spectra at the
same adapter size. This one gives every adapted matrix a rank from its block's depth:

- ``pattern: uniform``: ``rank`` everywhere;
- ``increasing`` / ``decreasing``: linear in depth from ``min_rank`` to ``max_rank``
  (or back), block 0 to the last block;
- a list such as ``[2, 4, 6, 8]``: one rank per equal share of the blocks (a quarter
  each here); its length must divide the number of blocks.

With ``match_params_of: adaptive-rank`` (and that policy's ``match_params``) every
rank is multiplied by one factor, then rounded (at least 1), so that the total
adapter parameter count, sum of r * (rows + cols), is the closest reachable to that
plan's on the same analysis: a size-matched control, uniform or patterned.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from spectune.plan.policies._common import BLOCK_TYPES, Decisions, PolicyConfig, module_name, usable
from spectune.plan.schema import LoraDecision


class LayerPatternConfig(PolicyConfig):
    pattern: Literal["uniform", "increasing", "decreasing"] | list[int] = "increasing"
    rank: int = Field(8, ge=1, description="pattern uniform: the rank of every adapted matrix")
    min_rank: int = Field(4, ge=1)
    max_rank: int = Field(16, ge=1)
    alpha_factor: float = Field(2.0, gt=0)
    module_types: list[str] = Field(default_factory=lambda: list(BLOCK_TYPES))
    match_params_of: str | None = Field(None, description="a rank policy whose total adapter parameters to match")
    match_params: dict[str, Any] = Field(default_factory=dict, description="that policy's parameters")

    @field_validator("pattern")
    @classmethod
    def _ranks(cls, v: Any) -> Any:
        if isinstance(v, list) and (not v or any(r < 1 for r in v)):
            raise ValueError(f"pattern {v}: a list needs at least one rank, each >= 1")
        return v


def depth_ranks(blocks: list[int], cfg: LayerPatternConfig) -> dict[int, float]:
    """Rank (before matching and rounding) of each block index, by its position in depth."""
    n = len(blocks)
    order = {b: i for i, b in enumerate(sorted(blocks))}
    if isinstance(cfg.pattern, list):
        k = len(cfg.pattern)
        if n % k:
            raise ValueError(f"pattern {cfg.pattern}: its {k} entries do not divide the {n} blocks evenly")
        return {b: float(cfg.pattern[i * k // n]) for b, i in order.items()}
    if cfg.pattern == "uniform":
        return {b: float(cfg.rank) for b in blocks}
    span = max(n - 1, 1)
    lo, hi = (cfg.min_rank, cfg.max_rank) if cfg.pattern == "increasing" else (cfg.max_rank, cfg.min_rank)
    return {b: lo + (hi - lo) * i / span for b, i in order.items()}


def adapter_params(ranks: dict[str, int], sizes: dict[str, int]) -> int:
    """LoRA's trainable parameters: r * (rows + cols) per adapted matrix (A is r x cols, B is rows x r)."""
    return int(sum(r * sizes[m] for m, r in ranks.items()))


def match_total(raw: dict[str, float], sizes: dict[str, int], target: int) -> dict[str, int]:
    """Ranks round(c * raw) (at least 1) with the one factor c whose total is closest to ``target``.

    The total grows in steps as c grows; bisection finds the last c below the target,
    and of it and the next step the closer total wins.
    """
    def ranks(c: float) -> dict[str, int]:
        return {m: max(1, int(round(c * r))) for m, r in raw.items()}

    lo, hi = 0.0, 1.0
    while adapter_params(ranks(hi), sizes) < target:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if adapter_params(ranks(mid), sizes) < target else (lo, mid)
    below, above = ranks(lo), ranks(hi)
    return below if target - adapter_params(below, sizes) <= adapter_params(above, sizes) - target else above


def make(metrics: pd.DataFrame, cfg: LayerPatternConfig) -> Decisions:
    cand = usable(metrics)
    cand = cand[cand["module_type"].isin(cfg.module_types) & pd.to_numeric(cand["layer_index"], errors="coerce").notna()]
    if cand.empty:
        raise ValueError(f"no matrices of types {cfg.module_types} inside numbered blocks")
    block = {module_name(n): int(b) for n, b in zip(cand["name"], cand["layer_index"])}
    sizes = {module_name(n): int(r) + int(c) for n, r, c in zip(cand["name"], cand["rows"], cand["cols"])}
    per_block = depth_ranks(sorted(set(block.values())), cfg)
    raw = {m: per_block[b] for m, b in block.items()}
    out = Decisions(lr_scale={n: 1.0 for n in usable(metrics)["name"]}, min_scale=1.0, max_scale=1.0)
    if cfg.match_params_of:
        target = _params_of(metrics, cfg.match_params_of, cfg.match_params)
        ranks = match_total(raw, sizes, target)
        out.notes.append(f"ranks scaled to {adapter_params(ranks, sizes):,} adapter parameters "
                         f"({cfg.match_params_of}'s plan: {target:,})")
    else:
        ranks = {m: max(1, int(round(r))) for m, r in raw.items()}
    targets = sorted(ranks)
    out.lora = LoraDecision(
        target_modules=targets, r=min(ranks.values()), lora_alpha=cfg.alpha_factor * min(ranks.values()),
        rank_pattern={t: ranks[t] for t in targets}, alpha_pattern={t: cfg.alpha_factor * ranks[t] for t in targets},
    )
    out.trainable = []  # base weights frozen; adapters (and new task heads) train
    shown = cfg.pattern if isinstance(cfg.pattern, str) else "-".join(map(str, cfg.pattern))
    out.notes.append(f"pattern {shown} over {len(per_block)} blocks; ranks {min(ranks.values())}-{max(ranks.values())}, "
                     f"mean {np.mean(list(ranks.values())):.3g}")
    return out


def _params_of(metrics: pd.DataFrame, policy: str, params: dict[str, Any]) -> int:
    """Total adapter parameters of another rank policy's plan on the same analysis."""
    from spectune.plan.policies import POLICIES

    if policy not in POLICIES or policy == "layer-pattern":
        raise ValueError(f"match_params_of {policy!r}: name another rank policy ({', '.join(p for p in POLICIES if p != 'layer-pattern')})")
    cls, make_other = POLICIES[policy]
    other = make_other(metrics, cls.model_validate(params))
    if other.lora is None:
        raise ValueError(f"match_params_of {policy!r}: that policy's plan has no LoRA adapters to match")
    rows = usable(metrics).assign(module=lambda d: d["name"].map(module_name)).set_index("module")
    lora = other.lora
    return int(sum(lora.rank_pattern.get(t, lora.r) * (int(rows.loc[t, "rows"]) + int(rows.loc[t, "cols"]))
                   for t in lora.target_modules))
