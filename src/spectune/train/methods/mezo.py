"""MeZO (Malladi et al., NeurIPS 2023, arXiv:2305.17333): zeroth-order SPSA with forward passes only.

Each step (the paper's Algorithm 1) draws a seed s, perturbs every trained parameter
in place by +eps z (z ~ N(0, I) regenerated from s), takes the loss, moves to -eps z,
takes the loss again, restores the weights, and steps along z:

    g = (L(theta + eps z) - L(theta - eps z)) / (2 eps)
    theta_i <- theta_i - lr_i (g z_i + wd_i theta_i)

z is never stored: the same generator seeded with s replays it for each of the four
passes, so memory stays at inference level (weights plus one forward's activations;
no gradients, no optimizer state). s is a pure function of ``train.seed`` and the
optimizer step, so a resumed run replays the same perturbations. lr_i and wd_i are
the run's optimizer groups' current rate and decay, so a rate plan scales each
matrix's step and the Trainer's schedule applies, as it would to AdamW.

The kind replaces the Trainer's backprop step (the ``training_step`` hook). The
Trainer's own optimizer step that follows is plain SGD over the same groups with every
gradient None, so it does nothing (torch skips a parameter without a gradient) and
holds no state; it is there so the scheduler has groups to schedule. As in the
paper's code (``zo_forward``), both losses are taken in eval mode (dropout off, so
the difference measures the perturbation alone) and the step logs L(theta + eps z).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from spectune.train.methods.base import RATES, TRAINABLE, BuildContext, Method, MethodBase, train_planned_matrices

# (parameter, its rate, its weight decay)
Trained = list[tuple[torch.nn.Parameter, float, float]]


class MezoConfig(MethodBase):
    kind: Literal["mezo"] = "mezo"
    eps: float = Field(1e-3, gt=0, description="perturbation scale eps of SPSA (the paper's 1e-3)")

    @model_validator(mode="after")
    def _sft_only(self) -> "MezoConfig":
        if self.objective != "sft":
            raise ValueError(f"method.objective={self.objective}: method.kind=mezo steps on a scalar loss from forward "
                             "passes and is not wired to TRL's preference trainers; use objective sft")
        return self


def step_seed(seed: int, step: int) -> int:
    """The perturbation seed of an optimizer step: a pure function of the run's seed and the step."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def _perturb(params: Trained, seed: int, scale: float) -> None:
    """theta += scale * z, z replayed from ``seed`` parameter by parameter (one parameter-sized draw at a time)."""
    gen = torch.Generator(device=params[0][0].device).manual_seed(seed)
    for p, _, _ in params:
        z = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
        p.add_(z, alpha=scale)


def _update(params: Trained, seed: int, projected: float) -> None:
    """theta_i <- theta_i - lr_i (g z_i + wd_i theta_i), z replayed from ``seed``."""
    gen = torch.Generator(device=params[0][0].device).manual_seed(seed)
    for p, lr, wd in params:
        z = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
        if wd:
            p.mul_(1.0 - lr * wd)
        p.add_(z, alpha=-lr * projected)


@torch.no_grad()
def spsa_step(loss: Callable[[], torch.Tensor], params: Trained, seed: int, eps: float,
              reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> tuple[torch.Tensor, float]:
    """One MeZO step on ``params``; returns L(theta + eps z) and the projected gradient g.

    ``reduce`` averages the two losses over processes, so every rank takes the same step.
    """
    _perturb(params, seed, eps)
    plus = loss().detach().float()
    _perturb(params, seed, -2 * eps)
    minus = loss().detach().float()
    _perturb(params, seed, eps)
    both = reduce(torch.stack([plus, minus]))
    projected = float((both[0] - both[1]) / (2 * eps))
    _update(params, seed, projected)
    return plus, projected


def trained(optimizer: Any) -> Trained:
    """Each trained parameter with its group's current rate and weight decay (the plan's and the schedule's)."""
    return [(p, float(g["lr"]), float(g.get("weight_decay", 0.0)))
            for g in optimizer.param_groups for p in g["params"] if p.requires_grad]


def training_step(trainer: Any, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The Trainer's step for this kind: one SPSA step on the batch, forward passes only."""
    if trainer.args.gradient_accumulation_steps > 1:
        raise ValueError("train.grad_accum > 1: method.kind=mezo takes one SPSA step per batch; set train.grad_accum: "
                         "1 and raise train.batch_size instead")
    inputs = trainer._prepare_inputs(inputs)

    def loss() -> torch.Tensor:
        with trainer.compute_loss_context_manager():
            return trainer.compute_loss(model, inputs)

    params = trained(trainer.optimizer)
    seed = step_seed(trainer.args.seed, trainer.state.global_step)
    reduce = (lambda t: trainer.accelerator.reduce(t, reduction="mean")) if trainer.accelerator.num_processes > 1 \
        else (lambda t: t)
    model.eval()
    try:
        plus, _ = spsa_step(loss, params, seed, trainer.method_config.eps, reduce)
    finally:
        model.train()
    return plus


def optimizer(model: torch.nn.Module, groups: list[dict[str, Any]], lr: float, kwargs: dict[str, Any],
              cfg: MezoConfig) -> torch.optim.Optimizer:
    """Plain SGD over the run's groups: never given a gradient, so its step is a no-op; it carries the rates the
    scheduler moves and ``training_step`` reads."""
    return torch.optim.SGD(groups, lr=lr)


def build(model: torch.nn.Module, cfg: MezoConfig, ctx: BuildContext) -> torch.nn.Module:
    model.requires_grad_(True)  # what is perturbed and stepped; nothing ever calls backward
    if ctx.plan is not None and ctx.plan.trainable is not None:
        train_planned_matrices(model, ctx.plan)
    return model


METHOD = Method(kind="mezo", config=MezoConfig, build=build, plan_sets=frozenset({RATES, TRAINABLE}),
                trains="every parameter, by zeroth-order SPSA (forward passes only)",
                memory="inference: weights + one forward's activations (no gradients, no optimizer state)",
                paper="arXiv:2305.17333", library="torch", mergeable=True, optimizer=optimizer,
                training_step=training_step)
