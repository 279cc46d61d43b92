"""A comparison is one YAML file: a shared base config, tasks and methods as fragments, and seeds.

Each cell of the grid is ``base <- task <- method <- {seed}`` merged key by key
into a full training config (``spectune.train.TrainConfig``), so every method
inherits the same model, data, schedule and budget unless it says otherwise. The
seed sets both the training seed and the data seed (which subsample of the
training set a low-data run sees, and the validation carve); two methods with
the same seed therefore see the same rows, and their scores can be paired.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from spectune._config import ConfigError, load_model
from spectune.train.config import TrainConfig

# metric name -> whether higher is better; the test split's value is what a comparison ranks
METRIC_DIRECTION = {"accuracy": True, "macro_f1": True, "loss": False, "perplexity": False}
# Under the base: a grid shows one overall progress bar, evaluates once at the end of each
# run (the final validation/test numbers are what it compares), tracks no spectra and keeps
# no checkpoints or final weights, unless the comparison's base asks for them.
CELL_DEFAULTS: dict[str, Any] = {
    "logging": {"progress": False, "tensorboard": False, "track_metrics": []},
    "eval": {"every": "no"},
    "output": {"save_every": "no", "save_final": False},
}
NAME_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a name that becomes a folder: no separators, no leading dot


class ParamSpace(BaseModel):
    """One searched value: a range (absolute, or as ratios of the cell's own configured value) or a list."""

    model_config = ConfigDict(extra="forbid")

    low: float | None = None
    high: float | None = None
    ratio: tuple[float, float] | None = Field(
        None, description="[low, high] as multiples of the value the cell's config already has (its lr, say)")
    log: bool = Field(False, description="sample on a log scale")
    choices: list[float | int | str | bool] | None = None
    points: int | None = Field(None, ge=2, description="grid sampler: this many values from low to high (log-spaced when log)")

    @model_validator(mode="after")
    def _one_form(self) -> "ParamSpace":
        forms = [self.low is not None or self.high is not None, self.ratio is not None, self.choices is not None]
        if sum(forms) != 1:
            raise ValueError("give exactly one of low/high, ratio or choices")
        if forms[0] and (self.low is None or self.high is None or not self.low < self.high):
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.ratio is not None and not 0 < self.ratio[0] < self.ratio[1]:
            raise ValueError(f"ratio {list(self.ratio)}: need 0 < low < high")
        if self.log and forms[0] and self.low is not None and self.low <= 0:
            raise ValueError("a log scale needs low > 0")
        if self.choices is not None and not self.choices:
            raise ValueError("choices is empty")
        return self


class SearchConfig(BaseModel):
    """Equal-budget hyper-parameter search on validation, before the final seeds read the test split."""

    model_config = ConfigDict(extra="forbid")

    trials: int = Field(6, ge=1, description="trials per task x method; the same for every searched method")
    seeds: list[int] = Field(default_factory=lambda: [100, 101], min_length=1,
                             description="seeds each trial trains on (kept apart from the final seeds); its score is their mean")
    sampler: Literal["tpe", "grid"] = "tpe"
    pruner: Literal["median", "none"] = Field("median", description="stop a trial whose running validation score is below the median")
    prune_on: Literal["seed", "epoch"] = Field(
        "seed", description="seed: compare after each search seed's run (no extra evaluation); epoch: after every epoch")
    methods: list[str] | None = Field(None, description="methods searched (None: all); the others run as configured")
    space: dict[str, ParamSpace] = Field(
        default_factory=lambda: {"train.lr": ParamSpace(ratio=(0.25, 4.0), log=True)},
        description="dotted cell-config path -> its space, for every searched method")
    spaces: dict[str, dict[str, ParamSpace]] = Field(
        default_factory=dict, description="method -> extra or replacing entries of its space (policy parameters)")
    objective: Literal["auto", "accuracy", "macro_f1", "loss", "perplexity"] = Field(
        "auto", description="validation metric maximised (accuracy, macro_f1) or minimised; auto: the comparison's metric")
    storage: str | None = Field(
        None, description="Optuna storage shared by workers: an RDB URL (sqlite:///..., postgresql://...) or a journal "
        "file path; default: <output_dir>/search/optuna.journal")
    stale_after_s: float = Field(900, gt=0, description="a running trial whose worker has been silent this long is retried")


class CompareConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "comparison"
    base: dict[str, Any] = Field(default_factory=dict, description="train-config fragment shared by every cell")
    tasks: dict[str, dict[str, Any]] = Field(description="task name -> train-config fragment (usually its data section)")
    methods: dict[str, dict[str, Any]] = Field(description="method name -> train-config fragment")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    baseline: str | None = Field(None, description="the method every other is paired against; default: the first")
    pairs: dict[str, str] = Field(
        default_factory=dict,
        description="method -> its own baseline, where the main one is the wrong reference (adaptive-rank LoRA vs uniform LoRA)",
    )
    metric: Literal["auto", "accuracy", "macro_f1", "loss", "perplexity"] = Field(
        "auto", description="the test metric statistics are computed on; auto: accuracy (classification), perplexity (LM)"
    )
    tie_tolerance: float = Field(0.0, ge=0, description="a paired difference within this counts as a tie")
    output_dir: str = "runs/compare"
    fresh_process: bool = Field(
        False, description="train each final cell in a new Python process, so its peak memory is its own and not the "
        "worker's history (as bench/train_memory.py measures it); costs one interpreter start a cell (about 7 s "
        "CPU). Set it when memory decides between methods: in a shared process a cell's peak also holds what "
        "earlier cells left in the heap (up to a few hundred MB)")
    search: SearchConfig | None = Field(None, description="tune each method on validation before the final seeds")
    order: Literal["seed", "task"] = Field(
        "seed", description="seed: every task and method of a seed before the next seed (a grid cut short is still "
        "paired everywhere); task: every seed of a task (and its search) before the next task (results arrive task by task)")
    stale_after_s: float = Field(
        900, gt=0, description="a final cell whose claim file its worker has not touched for this long is taken over "
        "(a worker on another machine that died); a worker on this machine that exits is seen at once")
    curve: str | None = Field(
        None, description="a dotted cell-config path whose value differs between tasks (data.max_examples): the "
        "report plots each method's paired difference against it, one line per task family (data.name or data.path)")

    @model_validator(mode="after")
    def _check(self) -> "CompareConfig":  # noqa: C901 - one list of independent checks
        for what, names in (("task", self.tasks), ("method", self.methods)):
            if not names:
                raise ValueError(f"at least one {what} is needed")
            for n in names:
                if not NAME_RULE.match(n):
                    raise ValueError(f"{what} name {n!r}: use letters, digits, '.', '_' or '-' (it names a folder)")
        if self.baseline is None:
            self.baseline = next(iter(self.methods))
        elif self.baseline not in self.methods:
            raise ValueError(f"baseline {self.baseline!r} is not one of the methods: {', '.join(self.methods)}")
        for method, base in self.pairs.items():
            for name in (method, base):
                if name not in self.methods:
                    raise ValueError(f"pairs: {name!r} is not one of the methods: {', '.join(self.methods)}")
            if method == base:
                raise ValueError(f"pairs: {method!r} is paired with itself")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}")
        if self.search is not None:
            self._check_search(self.search)
        return self

    def _check_search(self, search: SearchConfig) -> None:
        shared = sorted(set(search.seeds) & set(self.seeds))
        if shared:
            raise ValueError(f"search.seeds and seeds share {shared}: the search must not see the final seeds' rows")
        if len(set(search.seeds)) != len(search.seeds):
            raise ValueError(f"search.seeds repeat: {search.seeds}")
        for name in list(search.methods or []) + list(search.spaces):
            if name not in self.methods:
                raise ValueError(f"search: {name!r} is not one of the methods: {', '.join(self.methods)}")
        searched = set(search.methods or self.methods)
        for m in searched:
            ref = baseline_of(self, m)
            if ref is not None and ref not in searched:
                raise ValueError(f"search: {m!r} is searched but its baseline {ref!r} is not (unequal tuning budgets)")


def baseline_of(cfg: CompareConfig, method: str) -> str | None:
    """The method a method is paired against (None for the main baseline itself)."""
    if method in cfg.pairs:
        return cfg.pairs[method]
    return None if method == cfg.baseline else cfg.baseline


def load_compare_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> CompareConfig:
    """Read, override (``key.path=value``) and validate a comparison; every cell is validated too."""
    cfg = load_model(CompareConfig, source, overrides, what="comparison config")
    where = str(source) if not isinstance(source, dict) else "comparison config"
    for task in cfg.tasks:
        for method in cfg.methods:
            try:
                cell_config(cfg, task, method, cfg.seeds[0])
            except ConfigError as err:
                raise ConfigError(f"{where}: cell task={task} method={method}: {err}") from None
    if cfg.search is not None:
        from spectune.compare.search import check_search

        try:
            check_search(cfg)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    return cfg


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base`` key by key (nested mappings merge, anything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _substitute(node: Any, seed: int) -> Any:
    """``"${seed}"`` anywhere in a fragment becomes the cell's seed (e.g. random-select's draw)."""
    if isinstance(node, dict):
        return {k: _substitute(v, seed) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, seed) for v in node]
    if node == "${seed}":
        return seed
    return node


def cell_dir(cfg: CompareConfig, task: str, method: str, seed: int) -> Path:
    return Path(cfg.output_dir) / "cells" / task / method / f"seed-{seed}"


def nested(values: dict[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 1e-4}`` -> ``{"train": {"lr": 1e-4}}`` (a fragment to merge)."""
    out: dict[str, Any] = {}
    for path, v in values.items():
        node = out
        *parents, leaf = path.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = v
    return out


def cell_data(cfg: CompareConfig, task: str, method: str, seed: int, values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The merged (unvalidated) config of a cell, with searched ``values`` (dotted paths) laid on top."""
    data = merge(merge(merge(CELL_DEFAULTS, cfg.base), cfg.tasks[task]), cfg.methods[method])
    data = merge(data, nested(values or {}))
    data = merge(data, {"train": {"seed": seed}, "data": {"seed": seed}, "output": {"dir": str(cell_dir(cfg, task, method, seed))}})
    return _substitute(data, seed)


def cell_config(cfg: CompareConfig, task: str, method: str, seed: int, values: dict[str, Any] | None = None) -> TrainConfig:
    """The full training config of one cell (at the search's chosen ``values``, when given)."""
    from spectune.train import load_config

    return load_config(cell_data(cfg, task, method, seed, values))
