"""``alpha-balance`` (the TempBalance idea): rate from each matrix's heavy-tail exponent.

Higher alpha_hill = a less heavy-tailed, less trained spectrum, which gets a
higher rate: the multiplier maps alpha from [alpha_min, alpha_max] onto
[lr_min_ratio, lr_max_ratio] through ``map`` (linear in alpha, in sqrt(alpha), in
log2(alpha), or by rank). Matrices with fewer than ``min_evals`` eigenvalues
(TempBalance skips those under 50) keep the base rate.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from spectune.plan.policies._common import Decisions, RateConfig, finite_metric, minmax, usable


class AlphaBalanceConfig(RateConfig):
    map: Literal["linear", "sqrt", "log2", "rank"] = "linear"
    lr_min_ratio: float = Field(0.5, gt=0)
    lr_max_ratio: float = Field(1.5, gt=0)
    min_evals: int = Field(50, ge=1)
    metric: str = Field("alpha_hill", description="the exponent column to balance on")

    @model_validator(mode="after")
    def _order(self) -> AlphaBalanceConfig:
        if self.lr_min_ratio > self.lr_max_ratio:
            raise ValueError("lr_min_ratio must not exceed lr_max_ratio")
        return self


def transform(values: pd.Series, how: str) -> pd.Series:
    if how == "linear":
        return values
    if how == "sqrt":
        return np.sqrt(values)
    if how == "log2":
        return np.log2(values)
    return values.rank(method="average")


def make(metrics: pd.DataFrame, cfg: AlphaBalanceConfig) -> Decisions:
    rows = usable(metrics)
    small = rows[pd.to_numeric(rows["n_evals"], errors="coerce").fillna(0) < cfg.min_evals]
    big = rows[~rows["name"].isin(small["name"])]
    values, missing = finite_metric(big, cfg.metric)
    values = values[values > 0] if cfg.map in ("sqrt", "log2") else values
    out = Decisions(
        lr_scale={n: 1.0 for n in rows["name"]},
        min_scale=min(cfg.lr_min_ratio, 1.0),
        max_scale=max(cfg.lr_max_ratio, 1.0),
        excluded=missing + list(small["name"]),
    )
    if len(small):
        out.notes.append(f"{len(small)} matrices with fewer than {cfg.min_evals} eigenvalues keep the base rate")
    norm = minmax(transform(values, cfg.map), cfg.metric) if len(values) else None
    if norm is None:
        return out
    for name, m in norm.items():
        out.lr_scale[name] = float(cfg.lr_min_ratio + (cfg.lr_max_ratio - cfg.lr_min_ratio) * m)
    return out
