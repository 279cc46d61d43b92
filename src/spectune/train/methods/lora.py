"""LoRA (Hu et al., ICLR 2022) and its PEFT variants rsLoRA (rank-stabilised scaling) and DoRA (weight-decomposed).

A plan with LoRA decisions (adaptive-rank, layer-pattern, stable-rank) supplies the
targets and per-module ranks and alphas (PEFT's ``rank_pattern`` / ``alpha_pattern``,
names mapped to the task model's own); without one, every block linear gets rank ``r``.

Every LoRA-family kind also chooses how its adapters start (``init``: peft's own, the
data-driven eva / corda / lora_ga from the run's first ``init_batches`` training
batches, loftq, or milora; ``lora_init``) and how they step (``optimizer``: AdamW,
LoRA+ or LoRA-FA over the plan's groups; ``lora_optim``).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from spectune.plan import match_names, peft_kwargs
from spectune.train.methods import lora_convert, lora_init, lora_optim
from spectune.train.methods.base import (RANKS, RATES, TRAINABLE, BuildContext, Method, TargetedBase, peft_common,
                                         targets, train_planned_matrices)

LORA_INITS = ("default", "gaussian", "pissa", "olora", "orthogonal", *lora_init.DATA_INITS, "loftq", "milora")


class LoraFamilyConfig(TargetedBase):
    """Settings shared by every kind with LoRA adapters (PEFT's LoraConfig names and defaults where they exist)."""

    r: int = Field(8, ge=1, description="adapter rank (a rank plan's default rank replaces it)")
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    init: str = Field(
        "default", description="LoRA adapter initialisation: PEFT's init_lora_weights default (B = 0), gaussian, "
        "pissa, pissa_niter_<n>, olora, orthogonal; from the run's first init_batches training batches eva, corda, "
        "lora_ga; loftq (CUDA only); milora (PiSSA on the smallest singular triplets); ranks still come from the plan")
    init_batches: int = Field(8, ge=1, description="eva, corda, lora_ga: how many training batches (at "
                              "train.batch_size, in split order) the initialisation reads; recorded in init.json")
    optimizer: Literal["adamw", "loraplus", "lorafa"] = Field(
        "adamw", description="adamw (the Trainer's); loraplus: B at loraplus_lr_ratio x A's rate (peft's "
        "create_loraplus_optimizer); lorafa: A frozen, B's gradient projected (peft's create_lorafa_optimizer); "
        "a plan's per-matrix rates multiply both")
    loraplus_lr_ratio: float = Field(16.0, gt=0, description="loraplus: B's rate over A's (the LoRA+ paper's 2^4)")

    @field_validator("init")
    @classmethod
    def _init(cls, v: str) -> str:
        if v in LORA_INITS or re.fullmatch(r"pissa_niter_\d+", v):
            return v
        raise ValueError(f"init {v!r} is not a LoRA initialisation; use one of " + ", ".join(LORA_INITS)
                         + " or pissa_niter_<n>")

    @model_validator(mode="after")
    def _settings_fit(self) -> "LoraFamilyConfig":
        """Settings that only one init or optimizer reads, set under another, and pairs that cannot run together."""
        init, default = self.init, type(self).model_fields  # a default written back by config.yaml is not a choice
        if self.init_batches != default["init_batches"].default and init not in lora_init.DATA_INITS:
            raise ValueError(f"method.init_batches is read by the data-driven inits ({', '.join(lora_init.DATA_INITS)}),"
                             f" not by init {init}: drop it or change the init")
        if init in lora_init.DATA_INITS and self.objective != "sft":
            raise ValueError(f"method.init={init} is built from the run's training batches, and a preference objective "
                             f"(method.objective={self.objective}) collates none (TRL tokenizes the pairs inside its "
                             "trainer); use an init that reads no data (default, pissa, milora, ...)")
        if self.loraplus_lr_ratio != default["loraplus_lr_ratio"].default and self.optimizer != "loraplus":
            raise ValueError("method.loraplus_lr_ratio is read by optimizer loraplus, not "
                             f"{self.optimizer}: drop it or set method.optimizer: loraplus")
        if self.optimizer == "lorafa" and self.kind == "dora":
            raise ValueError("method.optimizer=lorafa pairs each lora_A with its lora_B, and DoRA adds a magnitude "
                             "vector it cannot place; use kind lora or rslora")
        if self.kind == "qlora" and init in lora_init.DATA_INITS + lora_init.BASE_REWRITING:
            raise ValueError(f"method.init={init} is not built for kind qlora (it reads or rewrites the base weight, "
                             "held in 4 bits here); use kind lora")
        if self.kind == "qlora" and self.optimizer != "adamw":
            raise ValueError(f"method.optimizer={self.optimizer} is not wired to kind qlora yet; use kind lora")
        return self


class LoraConfig(LoraFamilyConfig):
    kind: Literal["lora"] = "lora"


class RsLoraConfig(LoraFamilyConfig):
    kind: Literal["rslora"] = "rslora"


class DoraConfig(LoraFamilyConfig):
    kind: Literal["dora"] = "dora"


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
    init = lora_init.peft_settings(cfg.init, ctx.task, plan_ranks=plan is not None and plan.lora is not None)
    return peft.LoraConfig(**kw, lora_dropout=cfg.lora_dropout, **init, **peft_common(ctx))


def wrap(model: torch.nn.Module, config: Any, ctx: BuildContext) -> torch.nn.Module:
    """``peft.get_peft_model`` and then the plan's trainable set (matrices it trains in full besides the adapters)."""
    import peft

    model = peft.get_peft_model(model, config)
    if ctx.plan is not None and ctx.plan.trainable is not None:
        train_planned_matrices(model, ctx.plan)
    return model


def build(model: torch.nn.Module, cfg: LoraFamilyConfig, ctx: BuildContext) -> torch.nn.Module:
    """The adapters, started as ``init`` says (data passes and SVDs around ``get_peft_model``); under LoRA-FA
    every A frozen from the start, so the trainable counts and the plan's groups hold B alone."""
    model = lora_init.initialise(model, lora_config(model, cfg, ctx), cfg.init, ctx, cfg.init_batches,
                                 lambda m, config: wrap(m, config, ctx))
    if lora_convert.convertible(cfg.init, dora=cfg.kind == "dora"):
        ctx.notes[lora_convert.INITIAL] = lora_convert.lora_factors(model)  # B0, A0: to convert final/ at the end
    if cfg.optimizer == "lorafa":
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    return model


def optimizer(model: torch.nn.Module, groups: list[dict[str, Any]], lr: float, kwargs: dict[str, Any],
              cfg: LoraFamilyConfig) -> torch.optim.Optimizer:
    """The kind's optimizer over the run's groups: LoRA+ or LoRA-FA through peft, else the Trainer's AdamW.

    ``kwargs`` are the Trainer's AdamW arguments (spectune sets no other optimizer), so
    ``adamw`` builds exactly what the Trainer would.
    """
    if cfg.optimizer == "loraplus":
        return lora_optim.loraplus(model, groups, lr, kwargs, cfg.loraplus_lr_ratio)
    if cfg.optimizer == "lorafa":
        return lora_optim.lorafa(model, groups, lr, kwargs, cfg.r, cfg.lora_alpha)
    return torch.optim.AdamW(groups, lr=lr, **kwargs)


PLAN_SETS = frozenset({RATES, RANKS, TRAINABLE})
ADAPTER_MEMORY = "adapter: frozen weights + r(m+n) per adapted matrix with its gradients and AdamW state"
METHODS = [
    Method(kind="lora", config=LoraConfig, build=build, plan_sets=PLAN_SETS, trains="low-rank adapters", memory=ADAPTER_MEMORY,
           paper="arXiv:2106.09685", library="peft.LoraConfig", mergeable=True, optimizer=optimizer),
    Method(kind="rslora", config=RsLoraConfig, build=build, plan_sets=PLAN_SETS, trains="low-rank adapters", memory=ADAPTER_MEMORY,
           paper="arXiv:2312.03732", library="peft.LoraConfig(use_rslora=True)", mergeable=True, optimizer=optimizer),
    Method(kind="dora", config=DoraConfig, build=build, plan_sets=PLAN_SETS, trains="low-rank adapters", memory=ADAPTER_MEMORY + " + a magnitude",
           paper="arXiv:2402.09353", library="peft.LoraConfig(use_dora=True)", mergeable=True, optimizer=optimizer),
]
