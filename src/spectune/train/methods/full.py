"""Full fine-tuning: every parameter trains; a plan may re-weight rates and choose the trainable set."""

from __future__ import annotations

from typing import Any, Literal

import torch

from spectune.train.methods.base import RATES, TRAINABLE, BuildContext, Method, MethodBase, train_planned_matrices


class FullConfig(MethodBase):
    kind: Literal["full"] = "full"


def build(model: torch.nn.Module, cfg: Any, ctx: BuildContext) -> torch.nn.Module:
    model.requires_grad_(True)
    if ctx.plan is not None and ctx.plan.trainable is not None:
        train_planned_matrices(model, ctx.plan)
    return model


METHOD = Method(kind="full", config=FullConfig, build=build, plan_sets=frozenset({RATES, TRAINABLE}), trains="every parameter",
                memory="full: weights + gradients + AdamW state (16 bytes a parameter in fp32)",
                paper="-", library="torch", mergeable=True)
