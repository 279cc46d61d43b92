"""Plans in the user's own training script: one callback any transformers or TRL Trainer accepts.

    trainer = Trainer(model, args, ..., callbacks=[SpectralPlanCallback("alpha-balance")])

``spectune train`` builds the plan's optimizer groups when it creates the optimizer. A
user's Trainer has already created its own (two groups: decay / no decay) by the time a
callback runs, so this callback rebuilds that optimizer's groups in place at
``on_train_begin``, before the first step and with no optimizer state yet, and sets the
scheduler's per-group base rates to match. From there on the same code as ``spectune
train`` re-plans between epochs (``ReplanCallback``) and tracks spectra
(``SpectralTracker``).

Limit: resuming from a Trainer checkpoint is not supported. The Trainer loads the saved
optimizer state (the plan's groups) into the optimizer it created (its own two groups)
before any callback runs, so torch stops on the group count; an optimizer that already
holds state when this callback runs is refused with a message. ``spectune train
--resume`` builds the plan's groups at creation and resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from transformers import TrainerCallback

from spectune.plan.apply import param_groups
from spectune.plan.build import plan as make_plan
from spectune.plan.build import policy_config
from spectune.plan.schema import Plan
from spectune.train.callbacks import ReplanCallback, SpectralTracker, _analysis
from spectune.train.config import PlanSection

__all__ = ["SpectralPlanCallback", "regroup"]


def regroup(optimizer: Any, lr_scheduler: Any, groups: list[dict[str, Any]]) -> None:
    """Replace an optimizer's parameter groups by ``groups`` (each with its ``lr``), before its first step.

    Hyper-parameters a group does not set (betas, eps) come from the optimizer's own first
    group, so the user's choices stay. A ``LambdaLR`` (every transformers schedule) gets one
    base rate and one copy of its factor per new group, and each group's current rate is
    its base rate times today's factor. Refuses an optimizer that already holds state: its
    moments belong to the old groups.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    if any(inner.state.values()):
        raise RuntimeError("SpectralPlanCallback: the optimizer already holds state (a resumed or stepped run); "
                           "a plan's groups must be set before the first step. Resume with `spectune train --resume`.")
    old = {p for g in inner.param_groups for p in g["params"]}
    new = {p for g in groups for p in g["params"]}
    if new - old:
        raise RuntimeError(f"SpectralPlanCallback: {len(new - old)} plan parameters are not in the optimizer")
    template = {k: v for k, v in inner.param_groups[0].items() if k not in ("params", "lr", "weight_decay", "initial_lr")}
    inner.param_groups.clear()
    for g in groups:
        inner.add_param_group({**template, **g})
    sched = getattr(lr_scheduler, "scheduler", lr_scheduler)
    if sched is None:
        return
    lambdas = getattr(sched, "lr_lambdas", None)
    if lambdas is not None:
        sched.lr_lambdas = [lambdas[0]] * len(groups)
    sched.base_lrs = [g["lr"] for g in groups]
    for i, g in enumerate(inner.param_groups):
        g["initial_lr"] = sched.base_lrs[i]
        g["lr"] = sched.base_lrs[i] * (sched.lr_lambdas[i](sched.last_epoch) if lambdas is not None else 1.0)


class SpectralPlanCallback(TrainerCallback):
    """A spectral plan for any ``transformers.Trainer`` (or TRL trainer): its optimizer groups, re-planning, tracking.

    Args:
        policy: a plan policy (``spectune plan --help`` lists them); ignored when ``plan`` is given.
        params: the policy's parameters (validated now, so a typo fails before any model loads).
        plan: a fixed ``Plan`` (or a plan file) instead of planning on the model at train start.
        replan: ``epoch`` re-analyzes the weights and re-plans at every epoch start after the first; ``never`` keeps it.
        track_every_steps: record spectral metrics every N steps (0: off) to ``<output_dir>/spectra.jsonl``.
        output_dir: where plans and spectra go; default the Trainer's ``output_dir``.
        alpha_estimator: ``hill`` or ``farms``, for the plan and every re-plan.
    """

    def __init__(self, policy: str = "alpha-balance", params: dict[str, Any] | None = None,
                 plan: Plan | str | Path | None = None, replan: Literal["epoch", "never"] = "epoch",
                 track_every_steps: int = 0, output_dir: str | Path | None = None,
                 alpha_estimator: Literal["hill", "farms"] = "hill") -> None:
        if plan is None:
            policy_config(policy, params)
        self.section = PlanSection(policy=policy, params=dict(params or {}), replan=replan,
                                   alpha_estimator=alpha_estimator)
        self.fixed = Plan.load(plan) if isinstance(plan, (str, Path)) else plan
        self.track_every_steps = track_every_steps
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.cache: dict[str, Any] = {"options": {"alpha_estimator": alpha_estimator}}
        self.plan: Plan | None = None
        self.inner: list[TrainerCallback] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                       optimizer: Any = None, lr_scheduler: Any = None, **kw: Any) -> None:
        if model is None or optimizer is None:
            raise RuntimeError("SpectralPlanCallback needs the Trainer's model and optimizer at train start")
        run_dir = self.output_dir or Path(args.output_dir)
        if self.fixed is not None:
            self.plan = self.fixed
        else:
            result = _analysis(model, self.cache, state.global_step)
            self.plan = make_plan(result, self.section.policy or "uniform", self.section.params)
        groups = param_groups(model, self.plan, args.learning_rate, args.weight_decay)
        regroup(optimizer, lr_scheduler, groups)
        if state.is_world_process_zero:
            self.plan.save(run_dir / "plans" / f"plan-epoch0-step{state.global_step}.yaml")
        self.inner = []
        if self.fixed is None and self.section.replan == "epoch":
            self.inner.append(ReplanCallback(self.section, self.plan, args.learning_rate, args.weight_decay, run_dir,
                                             self.cache))
        if self.track_every_steps:
            tracker = SpectralTracker(run_dir, ["stable_rank", "alpha_hill"], self.track_every_steps, self.cache)
            tracker.on_train_begin(args, state, control, model=model, **kw)
            self.inner.append(tracker)

    def _forward(self, event: str, *a: Any, **kw: Any) -> None:
        for cb in self.inner:
            getattr(cb, event)(*a, **kw)

    def on_epoch_begin(self, *a: Any, **kw: Any) -> None:
        self._forward("on_epoch_begin", *a, **kw)

    def on_step_end(self, *a: Any, **kw: Any) -> None:
        self._forward("on_step_end", *a, **kw)

    def on_epoch_end(self, *a: Any, **kw: Any) -> None:
        self._forward("on_epoch_end", *a, **kw)

    def on_save(self, *a: Any, **kw: Any) -> None:
        self._forward("on_save", *a, **kw)

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every re-plan so far: epoch, step, plan file, mean rate scale."""
        return [h for cb in self.inner if isinstance(cb, ReplanCallback) for h in cb.history]
