"""LoRA (Hu et al., ICLR 2022) and its PEFT variants rsLoRA (rank-stabilised scaling) and DoRA (weight-decomposed).

A plan with LoRA decisions (adaptive-rank, layer-pattern, stable-rank) supplies the
targets and per-module ranks and alphas (PEFT's ``rank_pattern`` / ``alpha_pattern``,
names mapped to the task model's own); without one, every block linear gets rank ``r``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from spectune.plan import match_names, peft_kwargs
from spectune.train.methods.base import (RANKS, RATES, TRAINABLE, BuildContext, Method, TargetedBase, peft_common,
                                         targets, train_planned_matrices)

LORA_INITS = ("default", "gaussian", "pissa", "olora", "orthogonal")
DATA_INITS = ("eva", "corda", "loftq")  # PEFT has them; each needs data or a quantizer set up first


class LoraFamilyConfig(TargetedBase):
    """Settings shared by every kind with LoRA adapters (PEFT's LoraConfig names and defaults where they exist)."""

    r: int = Field(8, ge=1, description="adapter rank (a rank plan's default rank replaces it)")
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    init: str = Field(
        "default", description="LoRA adapter initialisation, passed to PEFT's init_lora_weights: default (B = 0), "
        "gaussian, pissa, pissa_niter_<n>, olora, orthogonal; ranks still come from the plan")

    @field_validator("init")
    @classmethod
    def _init(cls, v: str) -> str:
        if v in LORA_INITS or re.fullmatch(r"pissa_niter_\d+", v):
            return v
        if v in DATA_INITS:
            raise ValueError(f"init {v!r} needs a pass over training data (or a quantisation config) before training, "
                             "which spectune train does not run yet; use one of " + ", ".join(LORA_INITS))
        raise ValueError(f"init {v!r} is not an initialisation PEFT knows; use one of " + ", ".join(LORA_INITS)
                         + " or pissa_niter_<n>")


class LoraConfig(LoraFamilyConfig):
    kind: Literal["lora"] = "lora"


class RsLoraConfig(LoraFamilyConfig):
    kind: Literal["rslora"] = "rslora"


class DoraConfig(LoraFamilyConfig):
    kind: Literal["dora"] = "dora"


def init_weights(cfg: LoraFamilyConfig) -> bool | str:
    """PEFT's ``init_lora_weights`` for ``method.init`` (``default``: PEFT's own, B = 0)."""
    return True if cfg.init == "default" else cfg.init


def lora_config(model: torch.nn.Module, cfg: LoraFamilyConfig, ctx: BuildContext) -> Any:
    """PEFT's LoraConfig for the kind: the plan's targets, ranks and alphas where it has them, else ``r`` everywhere."""
    import peft

    rslora, dora = cfg.kind == "rslora", cfg.kind == "dora"
    plan = ctx.plan
    if plan is not None and plan.lora is not None:
        names = match_names([t + ".weight" for t in plan.lora.target_modules], [n for n, _ in model.named_parameters()])
        rename = {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in names.items()}
        kw = peft_kwargs(plan, rename)
        kw["use_rslora"] = kw["use_rslora"] or rslora
        kw["use_dora"] = kw["use_dora"] or dora
    else:
        kw = {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": targets(model, cfg), "use_rslora": rslora,
              "use_dora": dora}
    return peft.LoraConfig(**kw, lora_dropout=cfg.lora_dropout, init_lora_weights=init_weights(cfg), **peft_common(ctx))


def wrap(model: torch.nn.Module, config: Any, ctx: BuildContext) -> torch.nn.Module:
    """``peft.get_peft_model`` and then the plan's trainable set (matrices it trains in full besides the adapters)."""
    import peft

    model = peft.get_peft_model(model, config)
    if ctx.plan is not None and ctx.plan.trainable is not None:
        train_planned_matrices(model, ctx.plan)
    return model


def build(model: torch.nn.Module, cfg: LoraFamilyConfig, ctx: BuildContext) -> torch.nn.Module:
    return wrap(model, lora_config(model, cfg, ctx), ctx)


PLAN_SETS = frozenset({RATES, RANKS, TRAINABLE})
ADAPTER_MEMORY = "adapter: frozen weights + r(m+n) per adapted matrix with its gradients and AdamW state"
METHODS = [
    Method(kind="lora", config=LoraConfig, build=build, plan_sets=PLAN_SETS, trains="low-rank adapters", memory=ADAPTER_MEMORY,
           paper="arXiv:2106.09685", library="peft.LoraConfig", mergeable=True),
    Method(kind="rslora", config=RsLoraConfig, build=build, plan_sets=PLAN_SETS, trains="low-rank adapters", memory=ADAPTER_MEMORY,
           paper="arXiv:2312.03732", library="peft.LoraConfig(use_rslora=True)", mergeable=True),
    Method(kind="dora", config=DoraConfig, build=build, plan_sets=PLAN_SETS, trains="low-rank adapters", memory=ADAPTER_MEMORY + " + a magnitude",
           paper="arXiv:2402.09353", library="peft.LoraConfig(use_dora=True)", mergeable=True),
]
