"""``random-select``: the control for ``select``: as many matrices per type, chosen at random.

A spectral selection only earns its keep if it beats a random choice of the same
size (the LISA paper samples layers at random and does well). This policy keeps
``select``'s counts (``top_fraction`` of each module type, at least one) and draws
the members with a seeded generator, so a comparison over seeds averages over
random choices while each run stays reproducible.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from pydantic import Field

from spectune.plan.policies._common import Decisions, usable
from spectune.plan.policies.select import SelectConfig, selectable_types


class RandomSelectConfig(SelectConfig):
    seed: int = Field(0, description="seed of the random choice; a comparison sets it per cell")


def make(metrics: pd.DataFrame, cfg: RandomSelectConfig) -> Decisions:
    rows = usable(metrics)
    rng = np.random.default_rng(cfg.seed)
    out = Decisions(lr_scale={n: 1.0 for n in rows["name"]}, min_scale=1.0, max_scale=1.0)
    trainable: list[str] = []
    for kind in selectable_types(cfg):
        names = sorted(rows.loc[rows["module_type"] == kind, "name"])
        if not names:
            continue
        k = max(1, math.ceil(cfg.top_fraction * len(names)))
        trainable += [names[i] for i in sorted(rng.choice(len(names), size=k, replace=False))]
        out.notes.append(f"{kind}: {k} of {len(names)} trained, drawn at random (seed {cfg.seed})")
    out.trainable = sorted(trainable)
    return out
