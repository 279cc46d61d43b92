"""``select`` (the Spectrum idea): train only the matrices with the highest signal-to-noise.

Within each module type (all q projections compete with each other, not with the
MLP), matrices are ranked by ``snr`` and the top ``top_fraction`` (at least one
per type) are trained in full; the rest are frozen. Embeddings and the LM head
are frozen unless asked for (then the top fraction of their type trains too).
"""

from __future__ import annotations

import math

import pandas as pd
from pydantic import Field

from spectune.plan.policies._common import BLOCK_TYPES, Decisions, PolicyConfig, finite_metric, usable


class SelectConfig(PolicyConfig):
    top_fraction: float = Field(0.25, gt=0, le=1)
    metric: str = Field("snr", description="ranking column (higher = trained)")
    include_embeddings: bool = False
    include_head: bool = False
    include_other: bool = False


def selectable_types(cfg: SelectConfig) -> list[str]:
    """Module types that compete for training (block matrices, plus what the config adds)."""
    types = list(BLOCK_TYPES)
    if cfg.include_embeddings:
        types.append("embedding")
    if cfg.include_head:
        types.append("lm_head")
    if cfg.include_other:
        types.append("other")
    return types


def make(metrics: pd.DataFrame, cfg: SelectConfig) -> Decisions:
    rows = usable(metrics)
    types = selectable_types(cfg)
    out = Decisions(lr_scale={n: 1.0 for n in rows["name"]}, min_scale=1.0, max_scale=1.0)
    trainable: list[str] = []
    for kind in types:
        group = rows[rows["module_type"] == kind]
        if group.empty:
            continue
        values, missing = finite_metric(group, cfg.metric)
        out.excluded += missing
        k = max(1, math.ceil(cfg.top_fraction * len(values))) if len(values) else 0
        top = sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        trainable += [n for n, _ in top]
        out.notes.append(f"{kind}: {k} of {len(group)} trained by {cfg.metric}")
    out.trainable = sorted(trainable)
    return out
