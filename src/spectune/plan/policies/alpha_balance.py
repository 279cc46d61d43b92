"""``alpha-balance`` (TempBalance / Model Balancing): rate from the heavy-tail exponent alpha.

Higher alpha_hill = a less heavy-tailed, less trained spectrum, which gets a
higher rate. Two choices, each with the published form selectable:

- ``granularity``: ``matrix`` (one alpha, one rate per matrix; TempBalance, NeurIPS
  2023) or ``block`` (one alpha per transformer block, the mean of its matrices'
  alphas, and one rate shared by every matrix of the block; Model Balancing, EMNLP
  2024, whose ablation found per-block better than per-matrix for fine-tuning).
  Under ``block``, matrices outside the blocks (embeddings, pooler, head) keep the
  base rate, as in that paper's code.
- ``map``: ``linear`` / ``sqrt`` / ``log2`` / ``rank`` send alpha (transformed) from
  its [min, max] onto [lr_min_ratio, lr_max_ratio] (TempBalance's ``tb_linear_map``
  and this project's variants); ``sigmoid`` is Model Balancing's temperature map,
  10 ** (s (sigmoid(T (alpha - mean alpha)) - 1/2)) with s = sigmoid_max above the
  mean and sigmoid_min below it.

Matrices with fewer than ``min_evals`` eigenvalues (TempBalance skips those under
50) contribute no alpha; under ``matrix`` they keep the base rate, under ``block``
they share their block's rate. ``uncertainty`` (``plan.uncertainty``) shrinks or
excludes alphas whose fit is uncertain before any of this. Formulas, sources and
deviations: docs/policies.md.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from spectune.plan import uncertainty as unc
from spectune.plan.policies._common import Decisions, RateConfig, finite_metric, minmax, usable


class AlphaBalanceConfig(RateConfig):
    map: Literal["linear", "sqrt", "log2", "rank", "sigmoid"] = Field(
        "linear", description="linear/sqrt/log2/rank onto [lr_min_ratio, lr_max_ratio]; sigmoid: Model Balancing's map"
    )
    granularity: Literal["matrix", "block"] = Field(
        "matrix", description="matrix: one rate per matrix; block: one alpha and rate per transformer block"
    )
    lr_min_ratio: float = Field(0.5, gt=0)
    lr_max_ratio: float = Field(1.5, gt=0)
    temperature: float = Field(10.0, gt=0, description="sigmoid map: T, how fast the rate saturates in alpha - mean")
    sigmoid_min: float = Field(2.0, ge=0, description="sigmoid map: below the mean the scale falls to 10**(-sigmoid_min/2)")
    sigmoid_max: float = Field(1.0, ge=0, description="sigmoid map: above the mean the scale rises to 10**(sigmoid_max/2)")
    min_evals: int = Field(50, ge=1)
    metric: str = Field("alpha_hill", description="the exponent column to balance on")
    uncertainty: unc.Mode = unc.mode_field()
    uncertainty_flags: list[str] = unc.flags_field()

    @model_validator(mode="after")
    def _order(self) -> AlphaBalanceConfig:
        if self.lr_min_ratio > self.lr_max_ratio:
            raise ValueError("lr_min_ratio must not exceed lr_max_ratio")
        unc.check_flags(self.uncertainty_flags)
        return self


def transform(values: pd.Series, how: str) -> pd.Series:
    if how == "linear":
        return values
    if how == "sqrt":
        return np.sqrt(values)
    if how == "log2":
        return np.log2(values)
    return values.rank(method="average")


def sigmoid_scale(values: pd.Series, temperature: float, s_min: float, s_max: float) -> pd.Series:
    """Model Balancing's map: 10 ** (s (sigmoid(T (a - mean a)) - 1/2)), s = s_max above the mean, s_min below.

    The mean is over the units being balanced (blocks or matrices); a unit at the mean
    keeps the base rate, and the scale is confined to (10 ** (-s_min / 2), 10 ** (s_max / 2)).
    """
    from scipy.special import expit  # the logistic function without overflow at large T * d

    d = values - values.mean()
    sig = expit(temperature * d.to_numpy(dtype=float))
    factor = np.where(d > 0, s_max, s_min) * (sig - 0.5)
    return pd.Series(10.0**factor, index=values.index)


def block_values(rows: pd.DataFrame, values: pd.Series) -> tuple[pd.Series, dict[str, object]]:
    """Mean alpha per transformer block (over its matrices that have one), and each row's block."""
    block_of = {n: b for n, b in zip(rows["name"], rows["layer_index"]) if not pd.isna(b)}
    per_block: dict[object, list[float]] = {}
    for name, v in values.items():
        if name in block_of:
            per_block.setdefault(block_of[name], []).append(float(v))
    means = pd.Series({b: float(np.mean(v)) for b, v in sorted(per_block.items(), key=lambda kv: int(kv[0]))})
    return means, block_of


def make(metrics: pd.DataFrame, cfg: AlphaBalanceConfig) -> Decisions:
    rows = usable(metrics)
    small = rows[pd.to_numeric(rows["n_evals"], errors="coerce").fillna(0) < cfg.min_evals]
    big = rows[~rows["name"].isin(small["name"])]
    values, missing = finite_metric(big, cfg.metric)
    values = values[values > 0] if cfg.map in ("sqrt", "log2") else values
    adjusted = unc.adjust(metrics, values, cfg.metric, cfg.uncertainty, cfg.uncertainty_flags)
    values, missing = adjusted.values, missing + adjusted.excluded
    if cfg.map == "sigmoid":
        lo, hi = 10 ** (-cfg.sigmoid_min / 2), 10 ** (cfg.sigmoid_max / 2)
    else:
        lo, hi = cfg.lr_min_ratio, cfg.lr_max_ratio
    out = Decisions(lr_scale={n: 1.0 for n in rows["name"]}, min_scale=min(lo, 1.0), max_scale=max(hi, 1.0),
                    notes=list(adjusted.notes), alpha_metric=cfg.metric, alphas=values.astype(float).to_dict())
    if cfg.granularity == "block":
        units, block_of = block_values(rows, values)
        outside = [n for n in rows["name"] if n not in block_of]
        if outside:
            out.notes.append(f"granularity block: {len(outside)} matrices outside transformer blocks keep the base rate")
        silent = [n for n in rows["name"] if n in block_of and n not in values.index]
        if silent:
            out.notes.append(f"granularity block: {len(silent)} block matrices without a usable {cfg.metric} "
                             f"take their block's rate")
        out.notes.append(f"block alphas (mean {cfg.metric}): " + ", ".join(f"{int(b)}: {a:.3f}" for b, a in units.items()))
        # only blocks with no alpha at all stay at the base rate, so only their matrices are 'excluded'; under
        # uncertainty: exclude, a flagged matrix keeps the base rate (its block's rate is its neighbours')
        out.excluded = [n for n in rows["name"] if n in block_of and block_of[n] not in units.index] + adjusted.excluded
    else:
        units, block_of = values, {}
        out.excluded = missing + list(small["name"])
        if len(small):
            out.notes.append(f"{len(small)} matrices with fewer than {cfg.min_evals} eigenvalues keep the base rate")
    if not len(units):
        return out
    if cfg.map == "sigmoid":
        unit_scale = sigmoid_scale(units, cfg.temperature, cfg.sigmoid_min, cfg.sigmoid_max)
    else:
        norm = minmax(transform(units, cfg.map), cfg.metric)
        if norm is None:
            return out
        unit_scale = cfg.lr_min_ratio + (cfg.lr_max_ratio - cfg.lr_min_ratio) * norm
    if cfg.granularity == "block":
        for name, b in block_of.items():
            if b in unit_scale.index and name not in adjusted.excluded:
                out.lr_scale[name] = float(unit_scale[b])
    else:
        for name, s in unit_scale.items():
            out.lr_scale[name] = float(s)
    if not all(math.isfinite(v) for v in out.lr_scale.values()):
        raise ValueError("alpha-balance produced a non-finite scale")
    return out
