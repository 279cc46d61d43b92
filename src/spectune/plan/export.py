"""Hand a plan to other tools: PEFT ``LoraConfig`` keyword arguments and an axolotl fragment."""

from __future__ import annotations

import re
from typing import Any

import yaml

from spectune.plan.schema import Plan, PlanError


def _anchor(name: str) -> str:
    # PEFT tries rank_pattern keys in order with re.match(rf"(.*\\.)?({key})$", module):
    # an escaped, ^...$-anchored full name can only ever match its own module.
    return f"^{re.escape(name)}$"


def peft_kwargs(plan: Plan, module_names: dict[str, str] | None = None) -> dict[str, Any]:
    """``LoraConfig(**peft_kwargs(plan))`` gives every planned module exactly its rank and alpha.

    ``module_names`` maps plan module names to the names in the model PEFT will wrap
    (see ``apply.match_names``) when they differ, e.g. a task model adding ``bert.``.
    """
    lora = plan.lora
    if lora is None:
        raise PlanError(f"plan of policy '{plan.policy}' has no LoRA decisions to export")
    rename = module_names or {}
    targets = [rename.get(t, t) for t in lora.target_modules]
    return {
        "r": lora.r,
        "lora_alpha": lora.lora_alpha,
        "target_modules": "^(?:" + "|".join(re.escape(t) for t in targets) + ")$",
        "rank_pattern": {_anchor(rename.get(k, k)): v for k, v in lora.rank_pattern.items()},
        "alpha_pattern": {_anchor(rename.get(k, k)): v for k, v in lora.alpha_pattern.items()},
        "use_rslora": lora.use_rslora,
        "use_dora": lora.use_dora,
    }


def axolotl_fragment(plan: Plan, base_lr: float | None = None) -> str:
    """An axolotl config fragment: LoRA patterns, unfrozen parameters and lr groups."""
    out: dict[str, Any] = {}
    if plan.lora is not None:
        kw = peft_kwargs(plan)
        out.update(
            adapter="lora",
            lora_r=kw["r"],
            lora_alpha=kw["lora_alpha"],
            lora_target_modules=list(plan.lora.target_modules),
            lora_rank_pattern=kw["rank_pattern"],
            lora_alpha_pattern=kw["alpha_pattern"],
            peft_use_rslora=kw["use_rslora"],
            peft_use_dora=kw["use_dora"],
        )
        if plan.lora.use_qlora:
            out.update(adapter="qlora", load_in_4bit=True)
    if plan.trainable is not None:
        out["unfrozen_parameters"] = [_anchor(n) for n in plan.trainable]
    groups: dict[float, list[str]] = {}
    for name, s in plan.lr_scale.items():
        if s != 1.0:
            groups.setdefault(round(s, 4), []).append(name.removesuffix(".weight"))
    if groups:
        out["lr_groups"] = [
            {"name": f"scale_{s:g}", "modules": sorted(mods), **({"lr": base_lr * s} if base_lr else {"lr_scale": s})}
            for s, mods in sorted(groups.items())
        ]
    header = f"# spectune plan: policy {plan.policy}, model {plan.model}, analysis {plan.analysis_digest}\n"
    if set(plan.wd_scale.values()) - {1.0}:
        # axolotl has no per-module weight decay key: say so rather than drop the decisions silently
        header += ("# note: this plan's per-matrix weight-decay multipliers (wd_scale) have no axolotl equivalent; "
                   "train with spectune (param_groups) to apply them\n")
    return header + yaml.safe_dump(out, sort_keys=False, width=120)
