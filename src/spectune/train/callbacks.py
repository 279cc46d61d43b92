"""Trainer callbacks: re-planning between epochs, spectral tracking, metric logs, AdaLoRA budget.

They act only at epoch ends or every N steps, never inside the step itself, so a
plan costs the training loop nothing between re-plans.

Under several processes (torchrun, accelerate launch) every rank re-plans from its
own copy of the weights (DDP keeps them identical; under FSDP2 each rank gathers the
full weights from the shards, ``distributed.full_weights``), then takes rank 0's plan so
the rates agree by construction; only rank 0 writes files into the run folder.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import TrainerCallback

from spectune import _io
from spectune.analyze import analyze
from spectune.plan import Plan, param_groups, plan as make_plan
from spectune.train.config import PlanSection

STATE_FILE = "spectune_state.json"


def _analysis(model: torch.nn.Module, cache: dict[str, Any], step: int) -> Any:
    """One analysis per global step, shared by the re-planner and the tracker (``cache["options"]``: analysis options).

    Under FSDP2 every rank reaches this at the same point and reads the full (gathered) matrices, not its shard.
    """
    if cache.get("step") != step:
        from spectune.train.distributed import full_weights

        t = time.perf_counter()
        with full_weights(model) as whole:
            cache["result"] = analyze(whole, progress=False, **cache.get("options", {}))
        cache["step"] = step
        cache["seconds"] = cache.get("seconds", 0.0) + time.perf_counter() - t
    return cache["result"]


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree_across_ranks(plan: Plan) -> tuple[Plan, bool]:
    """Rank 0's plan on every rank, and whether this rank's own plan was already identical.

    Each rank computes its plan from its own weights; DDP keeps those bitwise equal, so
    the plans should match. One small broadcast per re-plan makes that a guarantee
    (ranks training at different rates would silently drift apart).
    """
    if not _distributed():
        return plan, True
    import torch.distributed as dist

    mine = plan.model_dump(mode="json")
    box = [mine if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    theirs = box[0]
    return (plan, True) if theirs == mine else (Plan.model_validate(theirs), False)


def epoch_index(epoch: float | None) -> int:
    """The epoch a (possibly fractional) ``state.epoch`` lies in: 1.5 is still epoch 1.

    A run resumed from a mid-epoch checkpoint calls ``on_epoch_begin`` with the
    restored fraction; rounding it up would apply the next epoch's plan early.
    """
    return math.floor((epoch or 0.0) + 1e-6)


def weighted_scale(groups: Iterable[dict[str, Any]]) -> float:
    """Parameter-weighted mean rate scale of optimizer groups (1 = the base rate for every weight).

    The effective step size of a plan: a plan whose big matrices sit below 1 trains
    less than a uniform baseline, whatever its per-layer pattern.
    """
    num = den = 0.0
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        num += n * float(g.get("lr_scale", 1.0))
        den += n
    return num / den if den else 1.0


def scale_groups(groups: list[dict[str, Any]], names: Iterable[str], ratio: float) -> list[dict[str, Any]]:
    """Multiply the rate of the named groups by ``ratio`` (the time-aware switch's adapters)."""
    wanted = set(names)
    if ratio == 1.0 or not wanted:
        return groups
    for g in groups:
        if g.get("name") in wanted:
            g["lr_scale"] = g.get("lr_scale", 1.0) * ratio
            g["lr"] = g["lr"] * ratio
    return groups


class ReplanCallback(TrainerCallback):
    """Recompute the plan on the current weights and move each group's rate, keeping the schedule's shape.

    The new rate goes into the scheduler's ``base_lrs`` (a LambdaLR multiplies those by
    the schedule factor each step; writing ``param_groups[i]['lr']`` alone would be
    overwritten at the next step), and into the group's current lr at today's factor.
    """

    def __init__(self, section: PlanSection, plan: Plan, base_lr: float, weight_decay: float, run_dir: Path,
                 cache: dict[str, Any], planned_epoch: int = 0, always: list[str] | None = None,
                 adapters: list[str] | None = None, adapter_ratio: float = 1.0) -> None:
        self.section = section
        self.always = list(always or [])  # parameters with groups whatever their requires_grad (time-aware switch)
        self.adapters = list(adapters or [])  # of those, the switch's adapters, at adapter_ratio x their layer's rate
        self.adapter_ratio = adapter_ratio
        self.plan = plan
        self.base_lr = base_lr
        self.weight_decay = weight_decay
        self.run_dir = run_dir
        self.cache = cache
        self.planned_epoch = planned_epoch
        self.history: list[dict[str, Any]] = []

    # the policy's own parameters, with the epoch where the policy reads one (phased)
    def _params(self, epoch: int) -> dict[str, Any]:
        params = dict(self.section.params)
        if self.section.policy == "phased":
            params["epoch"] = epoch
        return params

    def on_epoch_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       lr_scheduler: Any = None, **kw: Any) -> None:
        epoch = epoch_index(state.epoch)
        if self.section.replan == "epoch" and epoch > self.planned_epoch:
            self.replan(model, optimizer, lr_scheduler, epoch, state.global_step, save=state.is_world_process_zero)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    lr_scheduler: Any = None, **kw: Any) -> None:
        n = self.section.replan_every_steps
        if self.section.replan == "steps" and n and state.global_step % n == 0:
            self.replan(model, optimizer, lr_scheduler, epoch_index(state.epoch), state.global_step,
                        save=state.is_world_process_zero)

    def replan(self, model: torch.nn.Module, optimizer: Any, lr_scheduler: Any, epoch: int, step: int,
               save: bool = True) -> Plan:
        """Re-plan on this rank's weights, then adopt rank 0's plan; ``save`` (rank 0) writes it under plans/.

        Under DDP (and DeepSpeed ZeRO-1/2) the Trainer hands callbacks its unwrapped model,
        whose parameter names are the optimizer groups' names; under FSDP2 the sharded model,
        whose names are unchanged (its weights are gathered for the analysis).
        """
        result = _analysis(model, self.cache, step)
        new = make_plan(result, self.section.policy or "uniform", self._params(epoch), one_d_rule=self.section.one_d_rule)
        new, agreed = agree_across_ranks(new)
        with grads_for(model, self.always):
            groups = scale_groups(param_groups(model, new, 1.0, self.weight_decay), self.adapters, self.adapter_ratio)
            scales = {g["name"]: g["lr_scale"] for g in groups}
            # weight decay = base decay x the new plan's wd_scale (1-D parameters keep 0), as param_groups gives it
            decays = {g["name"]: (g["weight_decay"], g["wd_scale"]) for g in groups}
        sched = getattr(lr_scheduler, "scheduler", lr_scheduler)
        lambdas = getattr(sched, "lr_lambdas", None)
        for i, group in enumerate(optimizer.param_groups):
            s = scales.get(group.get("name"), group.get("lr_scale", 1.0))
            group["lr_scale"] = s
            if group.get("name") in decays:
                group["weight_decay"], group["wd_scale"] = decays[group["name"]]
            if sched is not None:
                sched.base_lrs[i] = self.base_lr * s
                factor = lambdas[i](sched.last_epoch) if lambdas else 1.0
                group["lr"] = self.base_lr * s * factor
                group["initial_lr"] = self.base_lr * s
            else:
                group["lr"] = self.base_lr * s
        self.plan = new
        self.planned_epoch = epoch
        path = self.run_dir / "plans" / f"plan-epoch{epoch}-step{step}.yaml"
        if save:
            new.save(path)
        self.history.append({"epoch": epoch, "step": step, "plan": str(path), "notes": new.notes, "ranks_agreed": agreed,
                             "mean_lr_scale": weighted_scale(optimizer.param_groups)})
        return new

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and ckpt.exists():
            self.plan.save(ckpt / "spectune_plan.yaml")
            _io.write_json(ckpt / STATE_FILE, {"planned_epoch": self.planned_epoch})


def restore_plan_state(checkpoint: Path) -> tuple[Plan | None, int]:
    """The plan and planned epoch saved with a checkpoint (so a resumed run keeps its phase)."""
    state = checkpoint / STATE_FILE
    if not state.exists():
        return None, 0
    data = json.loads(state.read_text())
    return Plan.load(checkpoint / "spectune_plan.yaml"), int(data.get("planned_epoch", 0))


class SpectralTracker(TrainerCallback):
    """Chosen metrics of every matrix at each epoch end (and every N steps): a tidy table on disk."""

    def __init__(self, run_dir: Path, metrics: list[str], every_steps: int, cache: dict[str, Any]) -> None:
        self.path = run_dir / "spectral_trajectory.parquet"
        self.metrics = metrics
        self.every = every_steps
        self.cache = cache
        self.run_dir = run_dir
        self.frames: list[pd.DataFrame] = []
        self.writer: Any = None
        self.writes = False  # set at train begin: every rank analyzes (same points, shared cache), rank 0 writes

    def _open(self, step: int) -> None:
        self.writes = True
        if self.path.exists():  # a resumed run continues its trajectory from its checkpoint's step
            table = pd.read_parquet(self.path)
            kept = table[table["step"] <= step]
            if len(kept) < len(table):  # points recorded after the checkpoint are recorded again
                _io.write_parquet(self.path, kept)
            self.frames.append(kept)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard" / "spectra"))
        except Exception as err:  # noqa: BLE001 - TensorBoard is optional; the parquet trajectory is the record
            warnings.warn(f"spectral tracking: no TensorBoard events ({type(err).__name__}: {err}); "
                          f"the trajectory is still written to {self.path}", stacklevel=2)
            self.writer = None

    def record(self, model: torch.nn.Module, step: int, epoch: float) -> None:
        result = _analysis(model, self.cache, step)
        if not self.writes:
            return
        cols = ["name", "module_type", "layer_index"] + [m for m in self.metrics if m in result.metrics]
        df = result.metrics[cols].copy()
        df.insert(0, "epoch", float(epoch))
        df.insert(0, "step", int(step))
        self.frames = [f for f in self.frames if not (f["step"] == step).all()] + [df]
        table = pd.concat(self.frames, ignore_index=True)
        _io.write_parquet(self.path, table)
        if self.writer is not None:
            for _, row in df.iterrows():
                for m in cols[3:]:
                    v = float(row[m]) if pd.notna(row[m]) else math.nan
                    if math.isfinite(v):
                        self.writer.add_scalar(f"{m}/{row['name']}", v, step)
            self.writer.flush()

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if state.is_world_process_zero and not self.writes:
            self._open(state.global_step)
        if state.global_step == 0:
            self.record(model, 0, 0.0)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if self.every and state.global_step % self.every == 0:
            self.record(model, state.global_step, state.epoch or 0.0)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.record(model, state.global_step, state.epoch or 0.0)


class MetricsLog(TrainerCallback):
    """Every log and evaluation as one JSON line in metrics.jsonl (flushed per line)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(_io.to_jsonable(record)) + "\n")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        """A resumed run logs again from its checkpoint's step: drop the lines written after it."""
        if state.global_step == 0 or not state.is_world_process_zero or not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [ln for ln in lines if ln.strip() and _step_of(ln) <= state.global_step]
        if len(kept) < len(lines):
            _io.write_text(self.path, "".join(ln + "\n" for ln in kept))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if logs and state.is_world_process_zero:
            self.write({"step": state.global_step, "epoch": state.epoch, **logs})


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line (a final record counts as after every step; a torn line is dropped)."""
    try:
        record = json.loads(line)
    except ValueError:
        return math.inf
    return math.inf if record.get("kind") == "final" else float(record.get("step", math.inf))


class AdaLoraBudget(TrainerCallback):
    """AdaLoRA reallocates its rank budget after every optimizer step (before gradients are zeroed)."""

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        inner = getattr(model, "base_model", None)
        if inner is not None and hasattr(inner, "update_and_allocate"):
            inner.update_and_allocate(state.global_step)


class StopOnNonFinite(TrainerCallback):
    """Keeps the last good checkpoint: once the loss is NaN/Inf, no further checkpoint is written."""

    def __init__(self) -> None:
        self.bad_step: int | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.bad_step is not None:
            control.should_save = False
            control.should_training_stop = True
            control.should_evaluate = False



SWITCH_FILE = "spectune_switch.json"


@contextmanager
def grads_for(model: torch.nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Treat the named parameters as trainable inside the block (to build or re-scale their optimizer groups).

    A time-aware run's optimizer holds every parameter a switch may train (base
    weights and dormant adapters) from the start, whatever its requires_grad now.
    """
    wanted = set(names)
    saved = {n: p.requires_grad for n, p in model.named_parameters() if n in wanted}
    params = dict(model.named_parameters())
    try:
        for n in saved:
            params[n].requires_grad_(True)
        yield
    finally:
        for n, flag in saved.items():
            params[n].requires_grad_(flag)


class StableRankSwitch(TrainerCallback):
    """Time-aware half of the stable-rank calibration: full tuning until a matrix settles, then LoRA.

    Every matrix starts in full fine-tuning; each *lightweight* matrix (chosen by the
    stable-rank plan) carries a dormant LoRA adapter of the plan's rank (B = 0, frozen;
    see ``methods.inject_switch_adapters``). At each check (epoch end, or every N steps)
    the stable rank of each lightweight matrix (its merged weight W + BA) is compared
    with the previous check; once its relative change stays below ``tol`` for
    ``patience`` checks in a row, the matrix switches: its base weight is frozen (its
    gradient set to None, so AdamW neither steps nor decays it) and its adapter trains
    from then on. This rule and its defaults are spectune's own reading of the paper's
    abstract ("when to start lightweight tuning"), not the paper's method.

    The optimizer holds the base weights and adapters from the start, so its state and
    a checkpoint need nothing special; the switch state (switched matrices, the last
    stable ranks and the settled counts) is saved with each checkpoint, so a resumed run
    switches exactly when an uninterrupted one would.
    """

    def __init__(self, modules: dict[str, tuple[str, list[str]]], tol: float, patience: int, every_steps: int,
                 run_dir: Path, cache: dict[str, Any], state: dict[str, Any] | None = None,
                 ranks: dict[str, int] | None = None) -> None:
        self.modules = modules  # analysis name -> (base weight's model name, adapter parameters' model names)
        self.tol, self.patience, self.every = tol, patience, every_steps
        self.run_dir = run_dir
        self.cache = cache
        self.ranks = ranks or {}
        state = state or {}
        self.last: dict[str, float] = dict(state.get("last", {}))
        self.calm: dict[str, int] = dict(state.get("calm", {}))
        self.switched: list[str] = list(state.get("switched", []))
        self.events: list[dict[str, Any]] = list(state.get("events", []))
        self.checked_step: int | None = state.get("checked_step")

    def _switch(self, model: torch.nn.Module, names: list[str]) -> None:
        params = dict(model.named_parameters())
        for n in names:
            base, adapters = self.modules[n]
            params[base].requires_grad_(False)
            params[base].grad = None
            for a in adapters:
                params[a].requires_grad_(True)

    def state(self) -> dict[str, Any]:
        return {"switched": self.switched, "events": self.events, "last": self.last, "calm": self.calm,
                "checked_step": self.checked_step}

    def check(self, model: torch.nn.Module, step: int, epoch: float, main: bool = True) -> None:
        if step == self.checked_step:  # a resumed run does not count the checkpoint's own check twice
            return
        self.checked_step = step
        df = _analysis(model, self.cache, step).metrics.set_index("name")
        newly = []
        for name in self.modules:
            if name in self.switched or name not in df.index:
                continue
            sr = float(df.loc[name, "stable_rank"])
            prev = self.last.get(name)
            self.last[name] = sr
            if prev is None or not math.isfinite(sr):
                continue
            change = abs(sr - prev) / max(abs(prev), 1e-12)
            self.calm[name] = self.calm.get(name, 0) + 1 if change < self.tol else 0
            if self.calm[name] >= self.patience:
                newly.append(name)
                self.events.append({"step": step, "epoch": epoch, "name": name, "stable_rank": sr, "change": change,
                                    "lora_rank": self.ranks.get(name)})
        if newly:
            self.switched += newly
            self._switch(model, newly)
            if main:
                _io.write_json(self.run_dir / "switches.json", {"rule": "lora", "switched": self.switched,
                                                               "events": self.events})

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self._switch(model, self.switched)  # a resumed run keeps earlier switches
        if state.global_step == 0:  # the base weights' stable ranks: the first point of comparison
            self.check(model, 0, 0.0, state.is_world_process_zero)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if self.every and state.global_step % self.every == 0:
            self.check(model, state.global_step, state.epoch or 0.0, state.is_world_process_zero)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if not self.every:
            self.check(model, state.global_step, state.epoch or 0.0, state.is_world_process_zero)

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.exists() and state.is_world_process_zero:
            _io.write_json(ckpt / SWITCH_FILE, self.state())


def restore_switches(checkpoint: Path | None) -> dict[str, Any]:
    """The switch state saved with a checkpoint (empty for a fresh run)."""
    path = checkpoint / SWITCH_FILE if checkpoint is not None else None
    return dict(json.loads(path.read_text())) if path is not None and path.exists() else {}
