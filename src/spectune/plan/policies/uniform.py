"""``uniform``: the baseline every other policy is compared with (all scales 1, all trainable)."""

from __future__ import annotations

import pandas as pd

from spectune.plan.policies._common import Decisions, PolicyConfig, usable


class UniformConfig(PolicyConfig):
    pass


def make(metrics: pd.DataFrame, cfg: UniformConfig) -> Decisions:
    return Decisions(lr_scale={n: 1.0 for n in usable(metrics)["name"]}, min_scale=1.0, max_scale=1.0)
