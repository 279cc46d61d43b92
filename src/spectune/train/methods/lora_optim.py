"""LoRA's own optimizers, LoRA+ and LoRA-FA, through peft, over the run's (plan's) optimizer groups.

The run hands the kind its groups: one per parameter with lr = base x the plan's
scale under a plan, or the Trainer's decay / no-decay pair without one. Each
optimizer's own rule then composes with them rather than replacing them:

- ``loraplus`` (Hayou et al., arXiv:2402.12354): B learns ``loraplus_lr_ratio`` times
  faster than A. Which parameter gets which rate is peft's
  (``peft.optimizers.create_loraplus_optimizer``: lora_B and every 1-D parameter at the
  ratio, LoRA embeddings at its fixed embedding rate, the rest at the base rate); the
  group keeps its plan rate in ``lr`` and carries peft's factor as ``lr_ratio``,
  applied around each step. So the schedule and a re-plan, which both rewrite
  ``lr``, keep the ratio: B steps at plan scale x base lr x ratio, A at plan scale x base lr.
- ``lorafa`` (Zhang et al., arXiv:2308.03303): A stays frozen at its initialisation and
  B's gradient is projected as if the full weight had been trained
  (``peft.optimizers.create_lorafa_optimizer``, its ``LoraFAOptimizer``). That optimizer
  pairs each A with the B that follows it in a group, so each A joins its B's group,
  at B's plan rate.
"""

from __future__ import annotations

from typing import Any

import torch

RATIO = "lr_ratio"  # an optimizer group's factor on its lr during a step (LoRA+'s B / A ratio)


def name_of(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def peft_ratios(optimizer: torch.optim.Optimizer, lr: float) -> dict[int, float]:
    """Each parameter's rate in a peft-built optimizer as a factor of the base rate ``lr``, by parameter id."""
    return {id(p): g["lr"] / lr for g in optimizer.param_groups for p in g["params"]}


def split_by_ratio(groups: list[dict[str, Any]], ratios: dict[int, float]) -> list[dict[str, Any]]:
    """The run's groups, each split where its parameters' ratios differ, every part carrying its ``lr_ratio``.

    A plan's one-parameter groups only gain the key; the Trainer's decay / no-decay
    pair splits into A-like and B-like parts. Every other key (lr, name, weight decay,
    scales) is kept, so re-planning still finds each group by its name.
    """
    out: list[dict[str, Any]] = []
    for group in groups:
        parts: dict[float, list[torch.nn.Parameter]] = {}
        for p in group["params"]:
            parts.setdefault(ratios.get(id(p), 1.0), []).append(p)
        out += [{**group, "params": params, RATIO: ratio} for ratio, params in parts.items()]
    return out


def _scale_lrs(optimizer: torch.optim.Optimizer, saved: list[float]) -> None:
    saved[:] = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = g["lr"] * g.get(RATIO, 1.0)


def with_ratios(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Run each step at every group's lr x its ``lr_ratio``, then give the groups their own lr back.

    Torch's step hooks, so any optimizer class works and ``lr`` stays what the
    scheduler and the re-planner set.
    """
    saved: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: _scale_lrs(opt, saved))

    def restore(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for g, lr in zip(opt.param_groups, saved):
            g["lr"] = lr

    optimizer.register_step_post_hook(restore)
    return optimizer


def loraplus(model: torch.nn.Module, groups: list[dict[str, Any]], lr: float, kwargs: dict[str, Any],
             ratio: float) -> torch.optim.Optimizer:
    """AdamW over the run's groups with peft's LoRA+ factors (B x ``ratio``) applied at every step."""
    from peft.optimizers import create_loraplus_optimizer

    reference = create_loraplus_optimizer(model, torch.optim.SGD, lr=lr, loraplus_lr_ratio=ratio)  # read, not used
    return with_ratios(torch.optim.AdamW(split_by_ratio(groups, peft_ratios(reference, lr)), lr=lr, **kwargs))


def paired_groups(model: torch.nn.Module, groups: list[dict[str, Any]], names: dict[int, str],
                  scaling: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's groups in LoRA-FA's layout: named parameters, each B preceded by its (frozen) A, and their scalings.

    A's own group, if the run gave it one, is dropped: A joins B's group (a plan gives
    an adapter's A and B the rate of the layer they adapt).
    """
    out: list[dict[str, Any]] = []
    for group in groups:
        params, pnames = [], []
        for p in group["params"]:
            n = names[id(p)]
            if ".lora_A." in n:
                continue
            if ".lora_B." in n:
                a_name = n.replace(".lora_B.", ".lora_A.")
                params.append(model.get_parameter(a_name))
                pnames.append(a_name)
            params.append(p)
            pnames.append(n)
        if params:
            out.append({**group, "params": params, "names": pnames,
                        "scaling_factors": [scaling.get(n) for n in pnames]})
    return out


def lorafa(model: torch.nn.Module, groups: list[dict[str, Any]], lr: float, kwargs: dict[str, Any],
           r: int, lora_alpha: float) -> torch.optim.Optimizer:
    """peft's LoraFAOptimizer over the run's groups: A frozen, B's gradient projected, B at its plan rate."""
    from peft.optimizers import create_lorafa_optimizer
    from peft.optimizers.lorafa import LoraFAOptimizer

    reference = create_lorafa_optimizer(model, r=r, lora_alpha=int(lora_alpha), lr=lr)  # freezes every lora_A
    whole = reference.param_groups[0]
    scaling = dict(zip(whole["names"], whole["scaling_factors"]))
    settings = {k: kwargs[k] for k in ("betas", "eps") if k in kwargs}
    return LoraFAOptimizer(paired_groups(model, groups, name_of(model), scaling), lr=lr, **settings)
