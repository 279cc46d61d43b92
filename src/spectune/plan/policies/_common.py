"""Shared pieces of the policies: what a policy returns, and min-max normalisation."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from spectune.plan.schema import LoraDecision

# matrices a policy may assign: anything with a spectrum (too_small rows keep exact norms)
USABLE = ("ok", "too_small")
BLOCK_TYPES = ("attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv", "ffn_up", "ffn_gate", "ffn_down")


class PolicyConfig(BaseModel):
    """Base of every policy's typed configuration (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Decisions:
    lr_scale: dict[str, float] = field(default_factory=dict)
    min_scale: float = 0.0
    max_scale: float = 1.0
    trainable: list[str] | None = None
    lora: LoraDecision | None = None
    notes: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)


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
