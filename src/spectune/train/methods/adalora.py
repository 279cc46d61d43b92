"""AdaLoRA (Zhang et al., ICLR 2023): LoRA in SVD form whose rank budget is pruned from ``r`` to a target in training."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from spectune.train.methods.base import RATES, TRAINABLE, BuildContext, Method, TargetedBase, peft_common, targets
from spectune.train.methods.lora import wrap


class AdaLoraConfig(TargetedBase):
    kind: Literal["adalora"] = "adalora"
    r: int = Field(8, ge=1, description="initial rank of every adapter")
    lora_alpha: float = Field(16, gt=0)
    adalora_target_r: int = Field(4, ge=1, description="average rank the budget is pruned down to")

    @model_validator(mode="after")
    def _budget(self) -> "AdaLoraConfig":
        """AdaLoRA prunes each adapter from rank r down to adalora_target_r: a target not below r has nothing to prune."""
        if self.adalora_target_r >= self.r:
            raise ValueError(f"method.adalora_target_r={self.adalora_target_r} must be below method.r={self.r} "
                             "(AdaLoRA starts every adapter at rank r and prunes the budget down to the target)")
        return self


def budget_callback() -> Any:
    from spectune.train.callbacks import AdaLoraBudget

    return AdaLoraBudget()


def build(model: torch.nn.Module, cfg: AdaLoraConfig, ctx: BuildContext) -> torch.nn.Module:
    import peft

    steps = ctx.total_steps
    config = peft.AdaLoraConfig(
        init_r=cfg.r, target_r=cfg.adalora_target_r, lora_alpha=cfg.lora_alpha, target_modules=targets(model, cfg),
        total_step=max(steps, 1), tinit=max(steps // 10, 0), tfinal=max(steps // 5, 0), **peft_common(ctx))
    return wrap(model, config, ctx)


METHOD = Method(kind="adalora", config=AdaLoraConfig, build=build, plan_sets=frozenset({RATES, TRAINABLE}), trains="SVD-form adapters",
                memory="adapter (SVD-form, rank pruned in training)", paper="arXiv:2303.10512",
                library="peft.AdaLoraConfig", mergeable=True, callbacks=lambda cfg, ctx: [budget_callback()])
