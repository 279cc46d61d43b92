"""FourierFT (Gao et al., ICML 2024): the update of each weight is the inverse 2-D Fourier transform of
``n_frequency`` trainable spectral coefficients at fixed random frequencies (``random_loc_seed``), times ``scaling``.

A rank plan (adaptive-rank, layer-pattern) reaches it through PEFT's
``n_frequency_pattern``: module i gets ``round(n_frequency * r_i / r)`` coefficients,
r_i its planned rank and r the plan's default rank, clipped to [1, out x in]. The
plan moves the kind's budget between modules in proportion to the ranks it chose,
as a LoRA of rank r_i would hold r_i / r times the default's parameters.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from pydantic import Field

from spectune.plan import Plan
from spectune.train.methods._peft import SIZED_SETS, planned_modules, tuner_build
from spectune.train.methods.base import BuildContext, Method, TargetedBase, targets


class FourierFTConfig(TargetedBase):
    kind: Literal["fourierft"] = "fourierft"
    n_frequency: int = Field(1000, ge=1, description="spectral coefficients per adapted matrix (at most out x in)")
    scaling: float = Field(150.0, gt=0, description="scale of the inverse-DFT update (PEFT: 100-150 for NLU)")
    random_loc_seed: int = Field(777, description="seed of the frequencies' locations, shared by all matrices")


def scaled_frequencies(n_frequency: int, rank: int, default_rank: int, entries: int) -> int:
    """``n_frequency`` scaled by a module's planned rank against the plan's default, within [1, entries]."""
    return max(1, min(entries, round(n_frequency * rank / default_rank)))


def pattern_key(name: str) -> str:
    """A key PEFT's FourierFT matches to exactly one module: it tries ``re.match(rf".*\\.{key}$", module)``, so the
    key is the module's escaped name after its first component (the layer index keeps it unique)."""
    return re.escape(name.split(".", 1)[1] if "." in name else name)


def plan_sizes(model: torch.nn.Module, cfg: FourierFTConfig, plan: Plan) -> dict[str, Any]:
    """The plan's targets and an ``n_frequency_pattern`` scaled from its ranks (``scaled_frequencies``)."""
    assert plan.lora is not None
    rename = planned_modules(model, plan)
    modules = dict(model.named_modules())
    pattern = {}
    for plan_name, name in rename.items():
        weight = modules[name].weight
        rank = plan.lora.rank_pattern.get(plan_name, plan.lora.r)
        pattern[pattern_key(name)] = scaled_frequencies(cfg.n_frequency, rank, plan.lora.r, weight.numel())
    return {"target_modules": sorted(rename.values()), "n_frequency_pattern": pattern}


def check_sizes(model: torch.nn.Module, cfg: FourierFTConfig, names: list[str] | str) -> None:
    """``n_frequency`` above a targeted matrix's entries is refused naming the setting (PEFT stops mid-build)."""
    if isinstance(names, str):
        return
    modules = dict(model.named_modules())
    for name in names:
        weight = getattr(modules.get(name), "weight", None)
        if weight is not None and weight.numel() < cfg.n_frequency:
            raise ValueError(f"method.n_frequency={cfg.n_frequency} exceeds the {weight.numel()} entries of {name} "
                             f"({'x'.join(map(str, weight.shape))}); lower it or narrow method.target_modules")


_tuner = tuner_build("FourierFTConfig", sizes=plan_sizes)


def build(model: torch.nn.Module, cfg: FourierFTConfig, ctx: BuildContext) -> torch.nn.Module:
    if ctx.plan is None or ctx.plan.lora is None:  # a plan's sizes are clipped to each matrix already
        check_sizes(model, cfg, targets(model, cfg))
    return _tuner(model, cfg, ctx)


METHOD = Method(kind="fourierft", config=FourierFTConfig, build=build, plan_sets=SIZED_SETS,
                trains="spectral coefficients of the update", paper="arXiv:2405.03003",
                library="peft.FourierFTConfig", mergeable=True,
                memory="spectral: frozen weights + n_frequency coefficients per matrix (a dense update in each step)")
