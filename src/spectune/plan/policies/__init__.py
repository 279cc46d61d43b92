"""Policies: each a typed config with documented defaults and a pure function metrics -> decisions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

from spectune.plan.policies import (
    adaptive_rank,
    alpha_balance,
    alpha_decay,
    by_type,
    layer_pattern,
    phased,
    random_select,
    select,
    stable_rank,
    uniform,
)
from spectune.plan.policies._common import Decisions, PolicyConfig

POLICIES: dict[str, tuple[type[PolicyConfig], Callable[[pd.DataFrame, Any], Decisions]]] = {
    "uniform": (uniform.UniformConfig, uniform.make),
    "phased": (phased.PhasedConfig, phased.make),
    "alpha-balance": (alpha_balance.AlphaBalanceConfig, alpha_balance.make),
    "adaptive-rank": (adaptive_rank.AdaptiveRankConfig, adaptive_rank.make),
    "select": (select.SelectConfig, select.make),
    "random-select": (random_select.RandomSelectConfig, random_select.make),
    "stable-rank": (stable_rank.StableRankConfig, stable_rank.make),
    "alpha-decay": (alpha_decay.AlphaDecayConfig, alpha_decay.make),
    "by-type": (by_type.ByTypeConfig, by_type.make),
    "layer-pattern": (layer_pattern.LayerPatternConfig, layer_pattern.make),
}

__all__ = ["POLICIES", "Decisions", "PolicyConfig"]
