"""Frozen: nothing trains; the baseline of an evaluation-only run (a plan has nothing to act on)."""

from __future__ import annotations

from typing import Any, Literal

import torch

from spectune.train.methods.base import BuildContext, Method, MethodBase


class FrozenConfig(MethodBase):
    kind: Literal["frozen"] = "frozen"


def build(model: torch.nn.Module, cfg: Any, ctx: BuildContext) -> torch.nn.Module:
    return model.requires_grad_(False)


METHOD = Method(kind="frozen", config=FrozenConfig, build=build, plan_sets=frozenset(), trains="nothing",
                memory="inference", paper="-", library="torch", mergeable=True)
