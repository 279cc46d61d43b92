"""Apply a plan to a live model: name matching and torch optimizer groups."""

from __future__ import annotations

import re
from typing import Any

import torch

from spectune.analyze.sources import canonical_name

# adapter parameters belong to the layer they adapt: PEFT's LoRA A/B and DoRA magnitude, IA3 vectors, LoHa and LoKr
# factors, HRA vectors, FourierFT coefficients, MiSS blocks, RandLoRA and VeRA scalings, OFT and BOFT rotations (each
# followed by ``.<adapter name>``), and spectune's SVFT coefficients (``svft_m``, no adapter name)
_ADAPTER = re.compile(r"\.(lora_[A-Za-z_]+|ia3_l|hada_\w+|lokr_\w+|hra_u|fourierft_spectrum|miss_block|randlora_\w+"
                      r"|vera_lambda_[bd]|oft_R|boft_[Rs]|svft_m)(\..*)?$")

from spectune.plan.schema import Plan, PlanError

# module wrappers that insert a path part into every parameter name below them: FSDP1, activation checkpointing
# (also what accelerate's FSDP2 applies for it), torch.compile. FSDP2 itself renames nothing.
_WRAPPER_PART = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)(?=\.|$)")


def unwrapped_name(name: str) -> str:
    """A parameter name without wrapper parts: ``layer.0._checkpoint_wrapped_module.attn.weight`` -> ``layer.0.attn.weight``."""
    return _WRAPPER_PART.sub("", name).lstrip(".")


def match_names(plan_names: list[str], model_names: list[str]) -> dict[str, str]:
    """Map each plan name to the model's parameter name.

    An analysis of a saved folder names ``encoder.layer.0...`` while the task model
    wrapping it says ``bert.encoder.layer.0...`` (and PEFT adds ``base_model.model.``
    and ``.base_layer``), so a plan name matches a model name exactly, else as the
    unique dotted suffix of one.
    """
    # PEFT keeps a frozen copy of a head it trains (original_module); the trained copy is the match
    # (names are matched through FSDP / checkpointing / compile wrappers: ``unwrapped_name``)
    canon = {canonical_name(unwrapped_name(m)): m for m in model_names if ".original_module." not in m}
    exact = set(canon)
    out: dict[str, str] = {}
    bad: list[str] = []
    for p in plan_names:
        q = unwrapped_name(p)
        if q in exact:
            out[p] = canon[q]
            continue
        hits = [c for c in canon if c.endswith("." + q)]
        if len(hits) == 1:
            out[p] = canon[hits[0]]
        else:
            bad.append(p if not hits else f"{p} (ambiguous: {', '.join(hits[:3])})")
    if bad:
        sample = ", ".join(sorted(model_names)[:5])
        raise PlanError(
            f"plan does not match the model: {len(bad)} of {len(plan_names)} plan parameters not found, "
            f"first: {', '.join(bad[:5])}; the model has e.g. {sample}"
        )
    return out


def param_groups(model: torch.nn.Module, plan: Plan, base_lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """One optimizer group per trainable parameter, named after it, with lr = base_lr * scale.

    Per-parameter groups keep the mapping group -> matrix explicit, which is what
    re-planning between epochs updates. 1-D parameters (biases, norms) take the
    scale of the matrix in the same module under rule 'owner' (base rate if the
    module has none, e.g. a LayerNorm) and no weight decay, the usual transformers
    convention. Parameters the plan does not know (a freshly initialised task
    head) train at the base rate. A matrix's weight decay is weight_decay times its
    plan's ``wd_scale`` (1 where the plan sets none); an adapter (LoRA A/B) takes the
    rate and decay multipliers of the layer it adapts. Groups are named without wrapper
    parts (``unwrapped_name``), so one built before FSDP / checkpoint wrapping and one
    built after (re-planning) carry the same name.
    """
    all_names = [n for n, _ in model.named_parameters()]
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = match_names(sorted(set(plan.lr_scale) | set(plan.wd_scale)), all_names)
    scale = {names[k]: v for k, v in plan.lr_scale.items()}
    decay = {names[k]: v for k, v in plan.wd_scale.items()}
    groups = []
    for n, p in params:
        s, w = scale.get(n), decay.get(n)
        if n not in scale and n not in decay and _ADAPTER.search(n):
            layer = next((m for m in (_ADAPTER.sub(".base_layer.weight", n), _ADAPTER.sub(".weight", n))
                          if m in scale or m in decay), None)
            if layer is not None:
                s, w = scale.get(layer), decay.get(layer)
        elif s is None and p.ndim < 2 and plan.one_d_rule == "owner":
            owner = n.rsplit(".", 1)[0] + ".weight"
            s = scale.get(owner, scale.get(n.rsplit(".", 1)[0] + ".base_layer.weight"))
        s = 1.0 if s is None else s
        w = 1.0 if w is None else w
        groups.append(
            {"params": [p], "name": unwrapped_name(n), "lr": base_lr * s, "lr_scale": s,
             "weight_decay": weight_decay * w if p.ndim >= 2 else 0.0, "wd_scale": w if p.ndim >= 2 else 0.0}
        )
    return groups


def apply_trainable(model: torch.nn.Module, plan: Plan) -> list[str]:
    """Freeze the analyzed matrices the plan does not train; returns the model names left trainable.

    Only matrices the plan lists are touched among those it knows: parameters the
    analysis never saw (task heads) keep their requires_grad, and 1-D parameters
    follow their module's matrix.
    """
    if plan.trainable is None:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    all_names = [n for n, _ in model.named_parameters()]
    known = match_names(list(plan.lr_scale), all_names)
    keep = {known[n] for n in match_names(plan.trainable, all_names)} if plan.trainable else set()
    known_model = set(known.values())
    owners = {m.rsplit(".", 1)[0] for m in known_model}
    kept_owners = {m.rsplit(".", 1)[0] for m in keep}
    for n, p in model.named_parameters():
        if n in known_model:
            p.requires_grad_(n in keep)
        elif p.ndim < 2 and n.rsplit(".", 1)[0] in owners:
            p.requires_grad_(n.rsplit(".", 1)[0] in kept_owners)
    return [n for n, p in model.named_parameters() if p.requires_grad]
