"""Shared pieces of the policies: what a policy returns, min-max normalisation, transformer blocks."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from spectune.analyze.naming import BLOCK_TYPES  # noqa: F401  (re-exported to the policies)
from spectune.plan.schema import LoraDecision

# matrices a policy may assign: anything with a spectrum (too_small rows keep exact norms)
USABLE = ("ok", "too_small")


class PolicyConfig(BaseModel):
    """Base of every policy's typed configuration (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")


class RateConfig(PolicyConfig):
    """Base of the policies that set per-matrix rates: how their scales relate to the base rate."""

    normalize: Literal["none", "mean"] = Field(
        "none",
        description="none: scales as the policy gives them; mean: rescaled so their parameter-weighted mean is 1 "
        "(the plan redistributes the step size instead of shrinking it), capped at max_scale",
    )
    max_scale: float = Field(4.0, ge=1, description="upper cap on any scale after normalize: mean")


@dataclass
class Decisions:
    lr_scale: dict[str, float] = field(default_factory=dict)
    min_scale: float = 0.0
    max_scale: float = 1.0
    wd_scale: dict[str, float] = field(default_factory=dict)  # weight-decay multipliers; absent = 1
    wd_min_scale: float = 1.0
    wd_max_scale: float = 1.0
    trainable: list[str] | None = None
    lora: LoraDecision | None = None
    notes: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    # the alphas an alpha-driven policy mapped, after its uncertainty rule (the plan report shows them)
    alpha_metric: str | None = None
    alphas: dict[str, float] = field(default_factory=dict)


def usable(metrics: pd.DataFrame) -> pd.DataFrame:
    return metrics[metrics["status"].isin(USABLE)]


def finite_metric(df: pd.DataFrame, column: str) -> tuple[pd.Series, list[str]]:
    """The column as floats over rows where it is finite, and the names where it is not."""
    values = pd.to_numeric(df[column], errors="coerce").astype(float)
    ok = np.isfinite(values.to_numpy())
    return pd.Series(values.to_numpy()[ok], index=df["name"].to_numpy()[ok]), list(df["name"].to_numpy()[~ok])


def minmax(values: pd.Series, what: str) -> pd.Series | None:
    """Min-max to [0, 1]; None (with a warning) when all values are equal, so callers use scale 1."""
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        warnings.warn(f"all {what} values are equal ({lo:.6g}): every matrix keeps the base rate", stacklevel=3)
        return None
    return (values - lo) / (hi - lo)


def module_name(param_name: str) -> str:
    """The module a weight belongs to (what PEFT targets)."""
    return param_name.removesuffix(".weight")


def normalize_mean(scales: dict[str, float], sizes: dict[str, float], cap: float) -> dict[str, float]:
    """Scales multiplied by one factor c so that sum(size * min(c * s, cap)) / sum(size) = 1.

    The weighted mean of the capped scales grows monotonically with c, so c is found by
    bisection; a scale that hits the cap stays there and the others take up the rest.
    Sizes are parameter counts (a matrix with more weights moves the mean more). When
    the cap makes a mean of 1 unreachable (every scale capped, or cap < 1) the scales
    are left as given and a ValueError says why.
    """
    names = [n for n in scales if sizes.get(n, 0) > 0]
    s = np.array([scales[n] for n in names], dtype=float)
    w = np.array([sizes[n] for n in names], dtype=float)
    if not len(s) or not np.any(s > 0):
        raise ValueError("normalize: mean needs at least one matrix with a positive scale and a known size")
    w = w / w.sum()

    def mean(c: float) -> float:
        return float(np.sum(w * np.minimum(c * s, cap)))

    if cap * float(w[s > 0].sum()) < 1 - 1e-12:
        raise ValueError(f"normalize: mean cannot reach 1 with max_scale={cap} (too many matrices at the cap)")
    lo, hi = 0.0, 1.0
    while mean(hi) < 1:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) < 1 else (lo, mid)
    c = hi
    out = dict(scales)
    for n, v in zip(names, s):
        out[n] = float(min(c * v, cap))
    return out


def weighted_mean(values: dict[str, float], sizes: dict[str, float]) -> float:
    """Parameter-weighted mean of per-matrix values (plain mean when no size is known)."""
    names = list(values)
    w = np.array([max(float(sizes.get(n, 0) or 0), 0.0) for n in names])
    v = np.array([values[n] for n in names], dtype=float)
    if not len(v):
        return float("nan")
    return float(np.sum(w * v) / w.sum()) if w.sum() > 0 else float(v.mean())


def sizes_of(metrics: pd.DataFrame) -> dict[str, float]:
    """Parameter count of every matrix in the table (what a weighted mean weighs by)."""
    return dict(zip(metrics["name"], pd.to_numeric(metrics["numel"], errors="coerce").fillna(0).astype(float)))
