"""The method registry: kind -> (typed config, how it builds on a model, what a plan may set, hooks).

``MethodConfig`` is a union of the kinds' configs discriminated on ``kind``, so a
setting of another kind is an error by type. Adding a method means adding a
module here with its ``METHOD`` (or ``METHODS``) and listing it below.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

import torch
from pydantic import Field

from spectune.plan import Plan
from spectune.train.methods import adalora, bitfit, frozen, full, ia3, lora, prompt_tuning, qlora
from spectune.train.methods import galore, lisa, mezo  # the memory-efficient full-parameter family
from spectune.train.methods import lora_convert
from spectune.train.methods import (boft, fourierft, hra, loha, lokr, miss, oft, p_tuning,  # PEFT tuners, SVFT
                                    prefix_tuning, randlora, svft, vera)
from spectune.train.methods.base import (HEAD_NAMES, RANKS, RATES, TRAINABLE, BuildContext, Method, MethodBase,
                                         count_trainable, head_modules, task_type)

_ALL: list[Method] = [full.METHOD, frozen.METHOD, bitfit.METHOD, *lora.METHODS, qlora.METHOD, adalora.METHOD,
                      ia3.METHOD, prompt_tuning.METHOD, lisa.METHOD, galore.METHOD, mezo.METHOD,
                      *(k.METHOD for k in (loha, lokr, fourierft, hra, oft, boft, vera, randlora, miss, svft,
                                           prefix_tuning, p_tuning))]
METHODS: dict[str, Method] = {m.kind: m for m in _ALL}

MethodConfig = Annotated[Union[tuple(m.config for m in _ALL)], Field(discriminator="kind")]  # type: ignore[valid-type]

# the policies whose plans decide per-module sizes (LoRA ranks); every policy decides rates
RANK_POLICIES = {"adaptive-rank", "layer-pattern"}


def kind_problem(data: dict[str, Any]) -> str | None:
    """A one-line reason a ``method`` mapping cannot be read as its kind (unknown kind, another kind's key), or None.

    pydantic reports both too, but as a union error; this names the key and the kinds
    that do have it, which is what a user who switched kinds needs to read.
    """
    kind = data.get("kind", "full")
    if kind not in METHODS:
        return f"method.kind={kind!r} is not a method kind; use one of {', '.join(METHODS)}"
    own = METHODS[kind].config.model_fields
    for key in data:
        if key not in own:
            having = [k for k, m in METHODS.items() if key in m.config.model_fields]
            where = f"a setting of kind {' / '.join(having)}" if having else "not a setting of any method kind"
            return f"method.{key} is {where}, not of kind {kind}: drop it or change the kind"
    return None


def plan_problem(kind: str, policy: str | None, params: dict[str, Any], fixed_file: bool) -> str | None:
    """Why a kind cannot take a plan (one line), or None: what the plan decides must be something the kind has."""
    if policy is None and not fixed_file:
        return None
    sets = METHODS[kind].plan_sets
    if not sets:
        return (f"method.kind={kind} trains {METHODS[kind].trains} and no weight matrix, so a plan's per-matrix rates, "
                "ranks or trainable set have nothing to apply to; drop plan or use a LoRA kind")
    ranks = policy in RANK_POLICIES or (policy == "stable-rank" and params.get("low", "lora") == "lora")
    if ranks and RANKS not in sets and not (policy == "stable-rank" and kind == "full"):
        return (f"plan.policy={policy} decides per-module ranks, but method.kind={kind} has "
                f"{'one global size' if RATES in sets else 'no size'} for its modules; use a rate policy, or a kind "
                f"with per-module ranks ({', '.join(k for k, m in METHODS.items() if RANKS in m.plan_sets)})")
    return None


def build_context(model: torch.nn.Module, cfg: MethodBase, task: str, plan: Plan | None, total_steps: int,
                  **context: Any) -> BuildContext:
    """What a kind builds from: the run's task, plan and length, the heads that train (``train_head``), and
    ``context`` (run_dir, seed, train_batches) for kinds that read them."""
    heads = head_modules(model, task) if cfg.train_head else []
    return BuildContext(task=task, plan=plan, total_steps=total_steps, heads=heads, **context)


def merge_problem(cfg: MethodBase, where: str = "method.kind") -> str | None:
    """Why a run's trained result cannot be merged into the base checkpoint (one line), or None.

    Initialisations that rewrite the frozen base at the start (PiSSA, OLoRA, MiLoRA, CorDA,
    LoRA-GA, LoftQ: W_res = W - scaling B0 A0) leave an adapter that belongs to W_res, which
    the saved checkpoint does not hold: merged into W it would be wrong, so it is refused.
    """
    spec = METHODS[cfg.kind]  # type: ignore[attr-defined]
    if not spec.mergeable:
        return (f"{where}: kind {cfg.kind} cannot be merged into the base weights ({spec.trains} are not weight "  # type: ignore[attr-defined]
                "changes); keep the adapter folder and load it with peft")
    init = str(getattr(cfg, "init", "default"))
    if lora_convert.rewrites_base(init) and not lora_convert.convertible(init, dora=cfg.kind == "dora"):
        return (f"{where}: method.init={init} rewrote the frozen base at the start of training under kind {cfg.kind}, "
                "and its adapter cannot be expressed over the checkpoint (LoftQ's base is quantized; DoRA's "
                "magnitudes come from the rewritten base); keep final/ with its base, or train with init default")
    return None


def apply_method(model: torch.nn.Module, cfg: MethodBase, task: str, plan: Plan | None, total_steps: int,
                 **context: Any) -> torch.nn.Module:
    """The model ready to train under ``cfg``'s kind: PEFT-wrapped where the kind asks, requires_grad set."""
    ctx = build_context(model, cfg, task, plan, total_steps, **context)
    return METHODS[cfg.kind].build(model, cfg, ctx)  # type: ignore[attr-defined]


__all__ = ["METHODS", "MethodConfig", "Method", "MethodBase", "BuildContext", "apply_method", "count_trainable",
           "head_modules", "task_type", "HEAD_NAMES", "RATES", "RANKS", "TRAINABLE", "kind_problem", "plan_problem",
           "build_context", "merge_problem"]
