"""``adaptive-rank`` (seed 003): per-module LoRA ranks from Hill alpha and MP spikes.

    alpha_norm  = minmax(alpha_hill)            (higher alpha: less structure, more to adapt)
    spikes_norm = 1 - minmax(num_spikes)        (fewer spikes: less learned structure)
    score       = w_hill * alpha_norm + w_spikes * spikes_norm

The ``top_fraction`` of candidate matrices by score are adapted (``select:
highest``, the seed README's stated intent; ``lowest`` reproduces the public code
that keeps the lowest scores). Their ranks run from min_rank to max_rank with the
score normalised over the selected set, interpolated linearly, geometrically
(``log``) or in square root; alpha = alpha_factor * rank.
"""

from __future__ import annotations

import math
from typing import Literal

import pandas as pd
from pydantic import Field, model_validator

from spectune.plan.policies._common import (
    BLOCK_TYPES,
    Decisions,
    PolicyConfig,
    finite_metric,
    minmax,
    module_name,
    usable,
)
from spectune.plan import uncertainty as unc
from spectune.plan.schema import LoraDecision


class AdaptiveRankConfig(PolicyConfig):
    w_hill: float = Field(0.7, ge=0)
    w_spikes: float = Field(0.3, ge=0)
    top_fraction: float = Field(0.5, gt=0, le=1)
    select: Literal["highest", "lowest"] = "highest"
    min_rank: int = Field(4, ge=1)
    max_rank: int = Field(64, ge=1)
    scaling: Literal["linear", "log", "sqrt"] = "linear"
    alpha_factor: float = Field(2.0, gt=0)
    module_types: list[str] = Field(default_factory=lambda: list(BLOCK_TYPES))
    use_rslora: bool = False
    use_dora: bool = False
    use_qlora: bool = False
    uncertainty: unc.Mode = unc.mode_field()
    uncertainty_flags: list[str] = unc.flags_field()

    @model_validator(mode="after")
    def _ranks(self) -> AdaptiveRankConfig:
        if self.min_rank > self.max_rank:
            raise ValueError(f"min_rank {self.min_rank} > max_rank {self.max_rank}")
        unc.check_flags(self.uncertainty_flags)
        return self


def interpolate(x: float, lo: int, hi: int, how: str) -> int:
    """Rank at position x in [0, 1] between lo and hi."""
    if how == "log":
        r = math.exp(math.log(lo) + x * (math.log(hi) - math.log(lo)))
    elif how == "sqrt":
        r = (math.sqrt(lo) + x * (math.sqrt(hi) - math.sqrt(lo))) ** 2
    else:
        r = lo + x * (hi - lo)
    return int(min(hi, max(lo, round(r))))


def scores(metrics: pd.DataFrame, cfg: AdaptiveRankConfig) -> tuple[pd.Series, list[str], unc.Adjusted]:
    """Composite need-for-adaptation score per candidate matrix, those without one, and the alphas it read."""
    cand = usable(metrics)
    cand = cand[cand["module_type"].isin(cfg.module_types)]
    alpha, miss_a = finite_metric(cand, "alpha_hill")
    adjusted = unc.adjust(metrics, alpha, "alpha_hill", cfg.uncertainty, cfg.uncertainty_flags)
    alpha, miss_a = adjusted.values, miss_a + adjusted.excluded
    spikes, miss_s = finite_metric(cand, "num_spikes")
    names = alpha.index.intersection(spikes.index)
    alpha, spikes = alpha[names], spikes[names]
    a = minmax(alpha, "alpha_hill") if len(names) else None
    s = minmax(spikes, "num_spikes") if len(names) else None
    a = a if a is not None else alpha * 0.0
    s_norm = 1 - s if s is not None else spikes * 0.0
    adjusted.values = alpha
    return cfg.w_hill * a + cfg.w_spikes * s_norm, sorted(set(miss_a) | set(miss_s)), adjusted


def make(metrics: pd.DataFrame, cfg: AdaptiveRankConfig) -> Decisions:
    """LoRA ranks for the top ``top_fraction`` of candidates by score (module docstring)."""
    score, missing, adjusted = scores(metrics, cfg)
    out = Decisions(lr_scale={n: 1.0 for n in usable(metrics)["name"]}, min_scale=1.0, max_scale=1.0, excluded=missing,
                    notes=list(adjusted.notes), alpha_metric="alpha_hill", alphas=adjusted.values.astype(float).to_dict())
    if missing:
        out.notes.append(f"{len(missing)} candidate matrices without finite alpha_hill/num_spikes are not adapted")
    if score.empty:
        raise ValueError(f"no candidate matrices of types {cfg.module_types} with finite alpha_hill and num_spikes")
    k = max(1, math.ceil(cfg.top_fraction * len(score)))
    # stable order: by score, ties broken by name, so the plan is deterministic
    ordered = sorted(score.items(), key=lambda kv: (-kv[1], kv[0]) if cfg.select == "highest" else (kv[1], kv[0]))
    chosen = pd.Series(dict(ordered[:k]))
    span = minmax(chosen, "selected scores") if len(chosen) > 1 else None
    pos = span if span is not None else chosen * 0.0 + 0.5
    # rank grows with the score in both selection directions, as in the seed's formula
    ranks = {module_name(n): interpolate(float(x), cfg.min_rank, cfg.max_rank, cfg.scaling) for n, x in pos.items()}
    targets = sorted(ranks)
    out.lora = LoraDecision(
        target_modules=targets,
        r=cfg.min_rank,
        lora_alpha=cfg.alpha_factor * cfg.min_rank,
        rank_pattern={t: ranks[t] for t in targets},
        alpha_pattern={t: cfg.alpha_factor * ranks[t] for t in targets},
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        use_qlora=cfg.use_qlora,
    )
    out.trainable = []  # base weights frozen; adapters (and new task heads) train
    out.notes.append(f"{k} of {len(score)} candidate matrices adapted (top {cfg.top_fraction:.0%}, select {cfg.select})")
    return out
