"""The time-aware stable-rank switch's adapters (seed 001): dormant LoRA adapters for the matrices that may switch.

Not a method kind: a full fine-tuning run under a ``stable-rank`` plan with
``switch_to_light`` gets them, and ``callbacks.StableRankSwitch`` turns each on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from spectune.plan import Plan, peft_kwargs


@dataclass
class SwitchAdapters:
    """LoRA adapters injected up front for the matrices a time-aware run may switch (see ``inject_switch_adapters``).

    ``modules`` maps each switchable matrix (its plan/analysis name) to its base weight's
    model name (``<module>.base_layer.weight``) and its adapter parameters' names.
    """

    tuner: Any  # the peft LoraModel that injected them; its merge_and_unload() gives the plain model back
    modules: dict[str, tuple[str, list[str]]]

    def parameter_names(self) -> list[str]:
        """Every parameter a switch touches (base weights and adapters): the optimizer holds them all from the start."""
        return [n for base, adapters in self.modules.values() for n in [base, *adapters]]

    def adapter_names(self) -> list[str]:
        """The dormant adapters' parameters alone (they train at ``plan.switch_lr_ratio`` x their layer's rate)."""
        return [n for _, adapters in self.modules.values() for n in adapters]


def inject_switch_adapters(model: torch.nn.Module, plan: Plan, light: dict[str, str], dropout: float = 0.0) -> SwitchAdapters:
    """Give every lightweight matrix a dormant LoRA adapter of the plan's rank, in place.

    The adapters come from PEFT's ``LoraModel`` (the plan's ``peft_kwargs``: rank and alpha
    per matrix; DoRA is off, since its magnitude would stop tracking a base weight that
    still trains). LoRA's B starts at zero, so an adapter adds nothing until it trains.
    Until its matrix switches, the base weight trains in full and the adapter is frozen.
    The model stays the task model (no ``PeftModel`` wrapper), so checkpoints hold base
    weights and adapters together and resume like any full fine-tuning run.
    """
    import peft

    rename = {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in light.items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    kw = peft_kwargs(plan, rename)
    kw["use_dora"] = False
    tuner = peft.tuners.lora.LoraModel(model, peft.LoraConfig(**kw, lora_dropout=dropout), "default")
    names = [n for n, _ in model.named_parameters()]
    modules: dict[str, tuple[str, list[str]]] = {}
    for plan_name, mname in rename.items():
        base = f"{mname}.base_layer.weight"
        if base not in names:
            raise RuntimeError(f"time-aware switch: no LoRA adapter was injected into {mname}")
        adapters = [n for n in names if n.startswith(mname + ".lora_")]
        modules[plan_name + ".weight"] = (base, adapters)
    # LoraModel froze everything but the adapters: restore the full-tuning set, adapters dormant
    canon = {n: n.replace(".base_layer.", ".") for n in names}
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" not in n and canon[n] in trainable)
    return SwitchAdapters(tuner=tuner, modules=modules)
