"""``stable-rank`` (seed 001, structure-aware half): full or lightweight tuning per matrix.

Within each module type, matrices whose stable rank is at or below the type's
``quantile`` get lightweight tuning (LoRA of rank ``lora_rank``, or frozen with
``low: frozen``); the others are trained in full. The reasoning: a matrix whose
energy already sits in few directions is served by a low-rank update, while a
matrix with a flat spectrum needs full-rank freedom. The split rule and its
default quantile (0.5) are this project's own, not the paper's (whose full text
is unavailable here); the time-aware half (when to switch) lives in training.
"""

from __future__ import annotations

from typing import Literal

import pandas as pd
from pydantic import Field

from spectune.plan.policies._common import BLOCK_TYPES, Decisions, PolicyConfig, finite_metric, module_name, usable
from spectune.plan.schema import LoraDecision


class StableRankConfig(PolicyConfig):
    quantile: float = Field(0.5, ge=0, le=1, description="per-type stable-rank quantile at or below which LoRA is used")
    low: Literal["lora", "frozen"] = "lora"
    lora_rank: int = Field(8, ge=1)
    alpha_factor: float = Field(2.0, gt=0)
    module_types: list[str] = Field(default_factory=lambda: list(BLOCK_TYPES))


def make(metrics: pd.DataFrame, cfg: StableRankConfig) -> Decisions:
    rows = usable(metrics)
    rows = rows[rows["module_type"].isin(cfg.module_types)]
    out = Decisions(lr_scale={n: 1.0 for n in usable(metrics)["name"]}, min_scale=1.0, max_scale=1.0)
    full: list[str] = []
    light: list[str] = []
    for kind, group in rows.groupby("module_type", sort=True):
        values, missing = finite_metric(group, "stable_rank")
        out.excluded += missing
        full += missing  # unknown structure: keep full tuning rather than guess
        if values.empty:
            continue
        thr = float(values.quantile(cfg.quantile))
        low = sorted(values[values <= thr].index)
        light += low
        full += sorted(values[values > thr].index)
        out.notes.append(f"{kind}: stable rank threshold {thr:.4g}; {len(low)} light, {len(values) - len(low)} full")
    out.trainable = sorted(full)
    if cfg.low == "lora" and light:
        targets = sorted(module_name(n) for n in light)
        out.lora = LoraDecision(target_modules=targets, r=cfg.lora_rank, lora_alpha=cfg.alpha_factor * cfg.lora_rank)
    return out
