"""``spectune train``: one configured fine-tuning run, read top to bottom as its stages.

The run folder holds everything needed to read or resume it: the resolved config,
every plan used, checkpoints, metrics.jsonl, the spectral trajectory, summary.json
(wall time, peak memory, cost per step, trainable parameters) and the final model or
adapter in safetensors. The stages live in ``stages``; what differs between
classification, causal-LM and preference runs lives in their recipe (``recipes``);
what differs between methods lives in their kind (``methods``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spectune.train import stages
from spectune.train.config import TrainConfig
from spectune.train.methods import count_trainable
from spectune.train.model import load_model
from spectune.train.stages import TrainingDiverged  # noqa: F401  (raised by run; the CLI catches it from here)


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    plans: list[str] = field(default_factory=list)


def run(cfg: TrainConfig, resume: bool = False, extra_callbacks: list[Any] | None = None,
        allow_config_change: bool = False) -> RunResult:
    """Train as configured; with ``resume`` continue from the run folder's last usable checkpoint.

    ``extra_callbacks`` are added to the Trainer (progress hooks, or a test's simulated crash).
    A resume under a config other than the stored one is refused unless ``allow_config_change``
    (the change is then recorded in summary.json and the old config kept beside the new).
    """
    # setup: the folder, the data, the model and its inputs
    start = stages.start(cfg, resume, allow_config_change)
    recipe, splits, task = stages.data(cfg)
    model, tok = load_model(cfg, task, len(splits.label_names or []) or None)
    inputs, skipped = recipe.inputs(splits, tok, cfg)
    steps = stages.total_steps(cfg, len(inputs["train"]), start.world)

    # the plan, the method on the model, and what watches the training
    cache: dict[str, Any] = {"options": {"alpha_estimator": cfg.plan.alpha_estimator}}
    plan, planned_epoch = stages.initial_plan(cfg, model, start, cache)
    batches = stages.train_batches(cfg, recipe, inputs, tok)
    model, ctx, switchable = stages.method(cfg, model, task, plan, steps, start, batches)
    counts = count_trainable(model)
    hooks = stages.callbacks(cfg, plan, planned_epoch, start, cache, switchable, extra_callbacks, ctx)

    # train
    trainer = stages.trainer(cfg, recipe, model, tok, inputs, plan, switchable, hooks, start, steps)
    train_out = stages.train(trainer, cfg, start, hooks)

    # finish: evaluate every final split once, save, summarise
    results, evaluation = stages.evaluate(trainer, cfg, inputs, train_out, hooks, start)
    counts = (*counts, count_trainable(model)[0])  # before save merges a switched run's adapters
    stages.save(cfg, trainer, tok, switchable, start, task, ctx)
    summary = stages.summary(cfg, start, trainer, train_out, hooks, task, counts, results, evaluation, splits,
                             skipped, cache)
    return RunResult(run_dir=start.run_dir, metrics=results, plans=summary["plans"])
