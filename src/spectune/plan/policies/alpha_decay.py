"""``alpha-decay`` (AlphaDecay, He et al., NeurIPS 2025): weight decay from each matrix's alpha.

A heavier-tailed spectrum (lower alpha) is read as more feature learning, which
the method protects with *weaker* decay; a lighter tail (higher alpha) gets
stronger decay. Per matrix (module-wise, as the paper): the decay multiplier maps
alpha linearly from its [min, max] over the adapted matrices onto
[wd_min_ratio, wd_max_ratio] (defaults 0.666 and 3, the reference code's), so the
matrix with the lowest alpha decays at wd_min_ratio x the base decay. Matrices
outside ``module_types`` (embeddings, heads: the method only reads the linear
layers of the blocks), with fewer than ``min_evals`` eigenvalues, or without the
metric keep multiplier 1.

Rates compose: ``rates`` names a rate policy (with ``rates_params``) whose
learning-rate scales, trainable set and LoRA decisions the plan carries beside
the decay multipliers. Without it every rate is the base rate.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from pydantic import Field, model_validator

from spectune.plan import uncertainty as unc
from spectune.plan.policies._common import BLOCK_TYPES, Decisions, PolicyConfig, finite_metric, minmax, usable


class AlphaDecayConfig(PolicyConfig):
    wd_min_ratio: float = Field(0.666, ge=0, description="decay multiplier of the lowest-alpha (heaviest-tailed) matrix")
    wd_max_ratio: float = Field(3.0, ge=0, description="decay multiplier of the highest-alpha matrix")
    min_evals: int = Field(50, ge=1, description="fewer eigenvalues: multiplier 1 (AlphaDecay skips them)")
    metric: str = Field("alpha_hill", description="the exponent column (median-xmin Hill, as AlphaDecay fits)")
    module_types: list[str] = Field(default_factory=lambda: list(BLOCK_TYPES), description="matrices that get a multiplier")
    rates: str | None = Field(None, description="a rate policy whose learning-rate decisions the plan also carries")
    rates_params: dict[str, Any] = Field(default_factory=dict, description="parameters of the `rates` policy")
    uncertainty: unc.Mode = unc.mode_field()
    uncertainty_flags: list[str] = unc.flags_field()

    @model_validator(mode="after")
    def _check(self) -> AlphaDecayConfig:
        if self.wd_min_ratio > self.wd_max_ratio:
            raise ValueError("wd_min_ratio must not exceed wd_max_ratio")
        unc.check_flags(self.uncertainty_flags)
        if self.rates is not None:
            if self.rates == "alpha-decay":
                raise ValueError("rates: alpha-decay cannot take its rates from itself")
            from spectune.plan.build import policy_config

            # validated (and completed with defaults) here, so a typo is an error naming the key
            self.rates_params = policy_config(self.rates, self.rates_params).model_dump(mode="json")
        elif self.rates_params:
            raise ValueError("rates_params given without rates (name the rate policy they belong to)")
        return self


def decay_scales(values: pd.Series, lo: float, hi: float, what: str) -> pd.Series | None:
    """alpha -> lo + (hi - lo) * (alpha - min) / (max - min): AlphaDecay's linear map (None if all equal)."""
    norm = minmax(values, what)
    return None if norm is None else lo + (hi - lo) * norm


def make(metrics: pd.DataFrame, cfg: AlphaDecayConfig) -> Decisions:
    rows = usable(metrics)
    if cfg.rates is not None:
        from spectune.plan.build import decide

        _, out = decide(metrics, cfg.rates, cfg.rates_params)
        out.notes = [f"rates: {cfg.rates}: {n}" for n in out.notes]
    else:
        out = Decisions(lr_scale={n: 1.0 for n in rows["name"]}, min_scale=1.0, max_scale=1.0)
    out.wd_min_scale, out.wd_max_scale = min(cfg.wd_min_ratio, 1.0), max(cfg.wd_max_ratio, 1.0)
    cand = rows[rows["module_type"].isin(cfg.module_types)]
    small = cand[pd.to_numeric(cand["n_evals"], errors="coerce").fillna(0) < cfg.min_evals]
    values, missing = finite_metric(cand[~cand["name"].isin(small["name"])], cfg.metric)
    adjusted = unc.adjust(metrics, values, cfg.metric, cfg.uncertainty, cfg.uncertainty_flags)
    values = adjusted.values
    out.alpha_metric, out.alphas = cfg.metric, values.astype(float).to_dict()
    out.excluded = sorted(set(out.excluded) | set(adjusted.excluded))
    out.notes += [f"alpha-decay: {n}" for n in adjusted.notes]
    out.wd_scale = {n: 1.0 for n in rows["name"]}
    if len(small):
        out.notes.append(f"alpha-decay: {len(small)} matrices with fewer than {cfg.min_evals} eigenvalues keep decay x1")
    if missing:
        out.notes.append(f"alpha-decay: {len(missing)} matrices without {cfg.metric} keep decay x1: {', '.join(missing[:5])}")
    others = len(rows) - len(cand)
    if others:
        out.notes.append(f"alpha-decay: {others} matrices outside module_types keep decay x1")
    scales = decay_scales(values, cfg.wd_min_ratio, cfg.wd_max_ratio, cfg.metric) if len(values) else None
    if scales is not None:
        for name, s in scales.items():
            out.wd_scale[name] = float(s)
    return out
