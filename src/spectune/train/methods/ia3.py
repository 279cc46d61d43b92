"""IA3 (Liu et al., NeurIPS 2022): learned vectors that rescale keys, values and feed-forward activations."""

from __future__ import annotations

import re
from typing import Literal

import torch

from spectune.train.methods.base import RATES, TRAINABLE, BuildContext, Method, TargetedBase, peft_common, targets
from spectune.train.methods.lora import wrap


class IA3Config(TargetedBase):
    kind: Literal["ia3"] = "ia3"


def build(model: torch.nn.Module, cfg: IA3Config, ctx: BuildContext) -> torch.nn.Module:
    import peft

    names = targets(model, cfg)
    ff = ([t for t in names if re.search(r"(up_proj|down_proj|dense|c_fc|fc)", t) and "attention" not in t]
          if isinstance(names, list) else None)
    return wrap(model, peft.IA3Config(target_modules=names, feedforward_modules=ff, **peft_common(ctx)), ctx)


METHOD = Method(kind="ia3", config=IA3Config, build=build, plan_sets=frozenset({RATES, TRAINABLE}), trains="per-feature scaling vectors",
                memory="vectors: one scale per output feature of each adapted layer", paper="arXiv:2205.05638",
                library="peft.IA3Config", mergeable=True)
