"""The stages every recipe shares, in the order ``run`` calls them: start, data, model, plan, method, callbacks,
trainer, train, finish. Each takes what it needs and returns what the next reads; the recipe supplies what differs."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from transformers import set_seed

from spectune import _io, _memory
from spectune.analyze import analyze
from spectune.analyze.builtin import model_path
from spectune.plan import Plan, match_names, param_groups, plan as make_plan
from spectune.train import callbacks as cb
from spectune.train import recipes
from spectune.train.checkpoints import CheckpointError, MarkComplete, last_checkpoint
from spectune.train.config import TrainConfig
from spectune.train.data import TextSplits, load_data
from spectune.train.finish import final_metrics, generalization_gaps
from spectune.train.methods import METHODS, BuildContext, build_context, count_trainable, lora_convert
from spectune.train.recipes import TrainerParts
from spectune.train.run_folder import check_run_dir, earlier_changes, required_state
from spectune.train.switch import SwitchAdapters, inject_switch_adapters
from spectune.train.trainer import training_arguments


UNWRAPPED_KINDS = ("full", "bitfit")  # kinds that train the loaded weights themselves (no adapter, no wrapper)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; the message names the step and the last good checkpoint."""


@dataclass
class Start:
    """Where a run writes and whether it continues: fixed by the first stage, read by the last."""

    run_dir: Path
    ckpt: Path | None
    config_changes: list[str]
    world: int
    main: bool
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class Hooks:
    """The run's callbacks and the ones later stages read back (the guard, the re-planner, the switch)."""

    callbacks: list[Any]
    metrics_log: cb.MetricsLog
    guard: cb.StopOnNonFinite
    replanner: cb.ReplanCallback | None = None
    switcher: cb.StableRankSwitch | None = None
    cost: Any = None


def world() -> tuple[int, bool]:
    """(world size, whether this process is rank 0) from the launcher's environment (torchrun, accelerate launch).

    Read before the Trainer exists (it sets up the process group), so files written
    before training are written by rank 0 alone.
    """
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")) == 0


def start(cfg: TrainConfig, resume: bool, allow_config_change: bool) -> Start:
    """Launch checks, the run folder (refusing a mix of runs), the stored config, and the seed."""
    from spectune.train import distributed

    size, main = world()
    distributed.check_fsdp_launch(cfg.train.distributed)  # before a model is loaded: FSDP that would not shard
    run_dir = Path(cfg.output.dir)
    ckpt, changes = check_run_dir(cfg, run_dir, resume, allow_config_change)
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        _io.write_text(run_dir / "config.yaml", cfg.to_yaml())
    set_seed(cfg.train.seed)
    return Start(run_dir=run_dir, ckpt=ckpt, config_changes=changes, world=size, main=main)


def data(cfg: TrainConfig) -> tuple[ModuleType, TextSplits, str]:
    """The recipe, the run's text splits and its task: the objective's own data (pairs), or the data's task."""
    recipe = recipes.objective_recipe(cfg)
    splits = recipe.splits(cfg) if recipe is not None else load_data(cfg.data)
    task = splits.task if cfg.model.task == "auto" else cfg.model.task
    if task != splits.task:
        raise ValueError(f"model.task={task} but the data is for {splits.task}")
    return recipe or recipes.task_recipe(task), splits, task


def total_steps(cfg: TrainConfig, train_rows: int, size: int) -> int:
    steps_per_epoch = math.ceil(train_rows / (cfg.train.batch_size * cfg.train.grad_accum * size))
    return cfg.train.max_steps if cfg.train.max_steps > 0 else math.ceil(steps_per_epoch * cfg.train.epochs)


def initial_plan(cfg: TrainConfig, model: torch.nn.Module, run: Start, cache: dict[str, Any]) -> tuple[Plan | None, int]:
    """The plan and planned epoch a run starts with: restored from the checkpoint on resume, else a fixed
    file, else the policy on the base weights. Every rank computes it from the same files and seed, so
    every rank holds the same plan. Its names must match the model before anything trains.

    The base weights' analysis is kept in ``cache`` as step 0's where the model the callbacks
    analyze has exactly those weights (kinds that only set requires_grad: full, BitFit), so a
    tracked run analyzes step 0 once.
    """
    plan, epoch = _first_plan(cfg, model, run.ckpt, cache)
    if plan is not None:
        match_names(list(plan.lr_scale), [n for n, _ in model.named_parameters()])  # fail before training
        if run.main and run.ckpt is None:
            plan.save(run.run_dir / "plans" / "plan-epoch0-step0.yaml")
    return plan, epoch


def _first_plan(cfg: TrainConfig, model: torch.nn.Module, ckpt: Path | None,
                cache: dict[str, Any]) -> tuple[Plan | None, int]:
    if ckpt is not None:
        plan, planned_epoch = cb.restore_plan_state(ckpt)
        if plan is not None:
            return plan, planned_epoch
    if cfg.plan.file:
        return Plan.load(cfg.plan.file), 0
    if not cfg.plan.policy:
        return None, 0
    params = dict(cfg.plan.params)
    if cfg.plan.policy == "phased":
        params["epoch"] = 0
    # qlora: the first plan reads the checkpoint's own weights, one tensor at a time from the folder, rather than
    # their 4-bit copies (re-plans read the training model's, dequantized, with the adapters merged)
    source: Any = model_path(cfg.model.name) if cfg.method.kind == "qlora" else model
    t = time.perf_counter()
    result = analyze(source, progress=False, alpha_estimator=cfg.plan.alpha_estimator)
    if cfg.method.kind in UNWRAPPED_KINDS and ckpt is None and cfg.logging.track_metrics:  # the tracker reads step 0
        cache.update(step=0, result=result, seconds=cache.get("seconds", 0.0) + time.perf_counter() - t)
    return make_plan(result, cfg.plan.policy, params, one_d_rule=cfg.plan.one_d_rule), 0


def train_batches(cfg: TrainConfig, recipe: ModuleType, inputs: dict[str, Any], tok: Any) -> Any:
    """Collated training batches for a kind that initialises from data (EVA, CorDA, LoRA-GA), or None.

    A function, so nothing is collated unless a kind asks; the batches come in the
    training split's order at the training batch size, so the same run sees the same ones.
    """
    collate = getattr(recipe, "collator", None)
    if collate is None:
        return None

    def batches() -> Any:
        loader = torch.utils.data.DataLoader(inputs["train"], batch_size=cfg.train.batch_size, shuffle=False,
                                             collate_fn=collate(tok))
        return iter(loader)

    return batches


def method(cfg: TrainConfig, model: torch.nn.Module, task: str, plan: Plan | None, steps: int, run: Start,
           batches: Any = None) -> tuple[torch.nn.Module, BuildContext, SwitchAdapters | None]:
    """The model under the kind, the context it was built in (the kind's callbacks read it) and, for the
    time-aware switch, the dormant adapters; refuses an empty trainable set."""
    light: dict[str, str] = {}
    plan_for_method = plan
    if cfg.plan.switch_to_light:
        light = _switchable(plan, run.world, model)
        # everything trains in full until the switch; the plan's rates still apply
        plan_for_method = plan.model_copy(update={"trainable": None, "lora": None}) if plan is not None else None
    ctx = build_context(model, cfg.method, task, plan_for_method, steps, run_dir=run.run_dir, seed=cfg.train.seed,
                        train_batches=batches)
    model = METHODS[cfg.method.kind].build(model, cfg.method, ctx)
    switchable = None
    if light:
        assert plan is not None
        # dormant adapters (B = 0, frozen) exist before the optimizer, which holds them from the start
        switchable = inject_switch_adapters(model, plan, light)
    if count_trainable(model)[0] == 0:
        raise ValueError("nothing to train: the method and plan leave no parameter with requires_grad")
    return model, ctx, switchable


def _switchable(plan: Plan | None, size: int, model: torch.nn.Module) -> dict[str, str]:
    """The plan's lightweight matrices, by model name, for the time-aware switch; refuses what cannot switch."""
    if plan is None or plan.lora is None:  # method.kind=full and a plan are checked with the config
        raise ValueError("plan.switch_to_light needs a plan with lightweight matrices (policy stable-rank with low: lora)")
    if size > 1:
        raise ValueError("plan.switch_to_light runs in one process: DDP registers the trainable parameters when it "
                         "wraps the model, so matrices cannot switch to adapters mid-run under several processes")
    return match_names([t + ".weight" for t in plan.lora.target_modules], [n for n, _ in model.named_parameters()])


def callbacks(cfg: TrainConfig, plan: Plan | None, planned_epoch: int, run: Start, cache: dict[str, Any],
              switchable: SwitchAdapters | None, extra: list[Any] | None, ctx: BuildContext) -> Hooks:
    """The run's callbacks in their order: metrics, the guard, re-planning, tracking, the kind's own, the switch,
    the caller's, and last the marker that says every other callback's files are written."""
    from spectune.train.cost import CostCallback

    hooks = Hooks(callbacks=[], metrics_log=cb.MetricsLog(run.run_dir / "metrics.jsonl"), guard=cb.StopOnNonFinite(),
                  cost=CostCallback())
    hooks.callbacks += [hooks.metrics_log, hooks.guard, hooks.cost]
    if plan is not None and cfg.plan.policy and cfg.plan.replan != "never" and plan.policy == cfg.plan.policy:
        hooks.replanner = cb.ReplanCallback(
            cfg.plan, plan, cfg.train.lr, cfg.train.weight_decay, run.run_dir, cache, planned_epoch,
            always=switchable.parameter_names() if switchable else None,
            adapters=switchable.adapter_names() if switchable else None, adapter_ratio=cfg.plan.switch_lr_ratio)
        hooks.callbacks.append(hooks.replanner)
    if cfg.logging.track_metrics:  # an empty list switches tracking off (a comparison grid needs no trajectories)
        hooks.callbacks.append(cb.SpectralTracker(run.run_dir, cfg.logging.track_metrics,
                                                  cfg.logging.track_spectra_every_steps, cache))
    kind_hook = METHODS[cfg.method.kind].callbacks
    if kind_hook is not None:
        hooks.callbacks += kind_hook(cfg.method, ctx)
    if switchable is not None:
        assert plan is not None and plan.lora is not None
        ranks = {t + ".weight": plan.lora.rank_pattern.get(t, plan.lora.r) for t in plan.lora.target_modules}
        hooks.switcher = cb.StableRankSwitch(switchable.modules, cfg.plan.switch_tol, cfg.plan.switch_patience,
                                             cfg.plan.switch_every_steps, run.run_dir, cache,
                                             cb.restore_switches(run.ckpt), ranks)
        hooks.callbacks.append(hooks.switcher)
    if cfg.train.distributed == "fsdp" and plan is not None:
        from spectune.train import distributed

        hooks.callbacks.append(distributed.ShardedGroupsCheck())  # each plan group holds its own sharded parameter
    hooks.callbacks += list(extra or [])
    hooks.callbacks.append(MarkComplete())
    return hooks


def trainer(cfg: TrainConfig, recipe: ModuleType, model: torch.nn.Module, tok: Any, inputs: dict[str, Any],
            plan: Plan | None, switchable: SwitchAdapters | None, hooks: Hooks, run: Start, steps: int) -> Any:
    """The recipe's Trainer over the run's pieces, its optimizer groups from the current plan."""

    def group_fn(m: torch.nn.Module) -> list[dict[str, Any]]:
        current = hooks.replanner.plan if hooks.replanner is not None else plan
        assert current is not None
        if switchable is None:
            return param_groups(m, current, cfg.train.lr, cfg.train.weight_decay)
        with cb.grads_for(m, switchable.parameter_names()):
            groups = param_groups(m, current, cfg.train.lr, cfg.train.weight_decay)
        return cb.scale_groups(groups, switchable.adapter_names(), cfg.plan.switch_lr_ratio)

    if cfg.logging.tensorboard:
        # the Trainer's TensorBoard callback reads its folder from the environment; keep it in the run folder
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.run_dir / "tensorboard" / "trainer")
    args = training_arguments(cfg, run.run_dir / "checkpoints", steps, run.world)
    parts = TrainerParts(cfg=cfg, model=model, tok=tok, args=args, data=inputs, callbacks=hooks.callbacks,
                         group_fn=group_fn if plan is not None else None, guard=hooks.guard,
                         method=METHODS[cfg.method.kind])
    built = recipe.trainer(parts)
    if not cfg.logging.progress:
        # without a bar the Trainer prints every log dict instead; metrics.jsonl already holds them
        from transformers import PrinterCallback

        built.remove_callback(PrinterCallback)
    return built


def train(built: Any, cfg: TrainConfig, run: Start, hooks: Hooks) -> Any:
    """Train (from the checkpoint on resume); a non-finite loss stops the run naming the last good checkpoint."""
    out = built.train(resume_from_checkpoint=str(run.ckpt) if run.ckpt else None)
    if hooks.guard.bad_step is not None:
        try:
            good = last_checkpoint(run.run_dir, required_state(cfg))
        except CheckpointError:
            good = None
        raise TrainingDiverged(
            f"loss became NaN/Inf at step {hooks.guard.bad_step}; training stopped. "
            f"Last good checkpoint: {good if good else 'none (no checkpoint was saved before the divergence)'}")
    return out


def evaluate(built: Any, cfg: TrainConfig, inputs: dict[str, Any], train_out: Any, hooks: Hooks,
             run: Start) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every final split once, the gaps, logged in metrics.jsonl by rank 0."""
    results, evaluation = final_metrics(built, inputs, cfg.eval.final_splits)
    results = {"training_loss": train_out.training_loss, **results, **generalization_gaps(results)}
    if run.main:
        hooks.metrics_log.write({"step": built.state.global_step, "kind": "final", **results})
    return results, evaluation


def save(cfg: TrainConfig, built: Any, tok: Any, switchable: SwitchAdapters | None, run: Start, task: str,
         ctx: BuildContext) -> None:
    """final/: the trained model or adapter with its tokenizer (a switched run's adapters merged into their bases;
    a base-rewriting init's adapter converted to one over the checkpoint); with ``output.merge`` also merged/, a
    plain model folder read back from final/."""
    if not cfg.output.save_final:
        return
    if switchable is not None:
        # final/ is a plain model: every adapter merged into its base weight (W + BA), names as before
        switchable.tuner.merge_and_unload()
    built.save_model(str(run.run_dir / "final"))  # rank 0 writes; every rank must call it (FSDP/DeepSpeed gather)
    if run.main:
        if lora_convert.INITIAL in ctx.notes:  # a base-rewriting init: final/ as an adapter over W
            lora_convert.convert_final(run.run_dir / "final", ctx.notes[lora_convert.INITIAL], str(cfg.method.init))
        tok.save_pretrained(str(run.run_dir / "final"))
        if cfg.output.merge:
            from spectune.train.merge import export_merged

            export_merged(run.run_dir, run.run_dir / "merged", task)


def summary(cfg: TrainConfig, run: Start, built: Any, train_out: Any, hooks: Hooks, task: str,
            counts: tuple[int, int, int],
            results: dict[str, Any], evaluation: dict[str, Any], splits: TextSplits, skipped: dict[str, int],
            cache: dict[str, Any]) -> dict[str, Any]:
    """summary.json: what the run measured, what it cost, and what it was given; written last, by rank 0."""
    replanner = hooks.replanner
    summary = {
        "metrics": results, "task": task, "method": cfg.method.kind, "objective": cfg.method.objective,
        "policy": cfg.plan.policy, "trainable_parameters": counts[0], "total_parameters": counts[1],
        "trainable_parameters_end": counts[2],  # the time-aware switch freezes bases and wakes adapters
        "switched_matrices": list(hooks.switcher.switched) if hooks.switcher else None,
        "wall_time_s": time.perf_counter() - run.t0,
        "train_runtime_s": train_out.metrics.get("train_runtime"),
        "train_samples_per_second": train_out.metrics.get("train_samples_per_second"),
        "train_steps_per_second": train_out.metrics.get("train_steps_per_second"),
        "evaluation": evaluation, "skipped_rows": skipped, "analysis_time_s": cache.get("seconds", 0.0),
        "peak_memory_mb": _memory.peak_rss_mb(),
        **hooks.cost.summary(),  # seconds_per_step, optimizer_state_parameters, peak_gpu_memory_mb
        "global_step": built.state.global_step,
        # mean over the plans the run used: the first optimizer groups, then each re-plan
        "mean_lr_scale": float(np.mean([built.initial_scale] + [h["mean_lr_scale"] for h in replanner.history]))
        if replanner else built.initial_scale,
        "plans": [h["plan"] for h in replanner.history] if replanner else [],
        "data": splits.description + (
            f"; dropped rows with no token left to predict after truncation: {skipped}" if any(skipped.values()) else ""),
        "config_changes": run.config_changes + earlier_changes(run.run_dir),
    }
    if run.main:
        _io.write_json(run.run_dir / "summary.json", summary)
    return summary
