"""``phased`` (seed 000): per-layer rates from the SVD, CE and CS metrics, one phase per epoch.

Default (``variant: bounded``), the form that keeps both the seed's stated intent
(higher rate for low M_SVD, low M_CE, high M_CS) and its "never above lr_base"
principle, on min-max normalised metrics M in [0, 1]:

    svd: s = 1 - alpha * M_SVD      ce: s = 1 - beta * M_CE      cs: s = 1 - gamma * (1 - M_CS)

then s = max(s, floor) so no layer is silently frozen. The seed's literal
formulas are variants, for comparison:
- ``section2``: s = 1 - k (1 - M) for all three phases (gives the LOWER rate to a low metric);
- ``section3``: svd/ce as section 2, cs: s = 1 + gamma * M_CS (exceeds the base rate);
- ``appendix``: the example code, s = 1 - M (svd, ce) and s = M (cs); the extreme layer
  gets 0, i.e. frozen, unless the floor lifts it.
"""

from __future__ import annotations

from typing import Literal

import pandas as pd
from pydantic import Field

from spectune.plan.policies._common import Decisions, RateConfig, finite_metric, minmax, usable

PHASE_METRIC = {"svd": "svd_metric", "ce": "ce_metric", "cs": "cs_metric"}


class PhasedConfig(RateConfig):
    phase: Literal["auto", "svd", "ce", "cs"] = Field("auto", description="auto: schedule[epoch % len]")
    epoch: int = Field(0, ge=0)
    schedule: list[Literal["svd", "ce", "cs"]] = Field(default_factory=lambda: ["svd", "ce", "cs"], min_length=1)
    variant: Literal["bounded", "section2", "section3", "appendix"] = "bounded"
    alpha: float = Field(1.0, ge=0, le=1, description="strength of the SVD phase")
    beta: float = Field(1.0, ge=0, le=1, description="strength of the CE phase")
    gamma: float = Field(1.0, ge=0, description="strength of the CS phase (<= 1 except in section3)")
    floor: float = Field(0.1, ge=0, le=1, description="lowest scale; 0 reproduces the seed's freezing")

    def current_phase(self) -> str:
        return self.schedule[self.epoch % len(self.schedule)] if self.phase == "auto" else self.phase


def scale(m: float, phase: str, cfg: PhasedConfig) -> float:
    """Learning-rate multiplier of a matrix with normalised metric ``m`` in ``phase``."""
    k = {"svd": cfg.alpha, "ce": cfg.beta, "cs": cfg.gamma}[phase]
    if cfg.variant == "bounded":
        s = 1 - k * (1 - m) if phase == "cs" else 1 - k * m
    elif cfg.variant == "section2" or (cfg.variant == "section3" and phase != "cs"):
        s = 1 - k * (1 - m)
    elif cfg.variant == "section3":
        s = 1 + k * m
    else:  # appendix
        s = m if phase == "cs" else 1 - m
    return max(s, cfg.floor)


def make(metrics: pd.DataFrame, cfg: PhasedConfig) -> Decisions:
    if cfg.variant != "section3" and cfg.gamma > 1:
        raise ValueError(f"gamma={cfg.gamma} > 1 would push rates above the base rate; only variant section3 allows it")
    phase = cfg.current_phase()
    column = PHASE_METRIC[phase]
    values, missing = finite_metric(usable(metrics), column)
    max_scale = 1 + cfg.gamma if (cfg.variant == "section3" and phase == "cs") else 1.0
    out = Decisions(min_scale=min(cfg.floor, 1.0), max_scale=max_scale, excluded=missing)
    out.notes.append(f"phase {phase} (epoch {cfg.epoch}), metric {column}, variant {cfg.variant}")
    if missing:
        out.notes.append(f"{len(missing)} matrices without a finite {column} keep the base rate")
    norm = minmax(values, column) if len(values) else None
    for name in usable(metrics)["name"]:
        out.lr_scale[name] = 1.0
    if norm is None:
        if len(values):
            out.notes.append(f"all {column} values are equal: uniform scale 1")
        return out
    for name, m in norm.items():
        out.lr_scale[name] = scale(float(m), phase, cfg)
    return out
