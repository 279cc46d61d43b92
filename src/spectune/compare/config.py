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
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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

    @model_validator(mode="after")
    def _check(self) -> "CompareConfig":  # noqa: C901 - one list of independent checks
        for what, names in (("task", self.tasks), ("method", self.methods)):
            if not names:
                raise ValueError(f"at least one {what} is needed")
            for n in names:
                if not _NAME.match(n):
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
        return self


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


def cell_config(cfg: CompareConfig, task: str, method: str, seed: int) -> TrainConfig:
    """The full training config of one cell."""
    from spectune.train import load_config

    data = merge(merge(merge(CELL_DEFAULTS, cfg.base), cfg.tasks[task]), cfg.methods[method])
    data = merge(data, {"train": {"seed": seed}, "data": {"seed": seed}, "output": {"dir": str(cell_dir(cfg, task, method, seed))}})
    return load_config(_substitute(data, seed))
