"""What the recipes share: the pieces of a run a Trainer is built from, and mapping a row function over the splits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from spectune.train.config import TrainConfig
from spectune.train.data import TextSplits

SPLITS = ("train", "validation", "test")


@dataclass
class TrainerParts:
    """Everything a recipe's Trainer is made of; the ``trainer`` stage fills it, the recipe picks its Trainer class."""

    cfg: TrainConfig
    model: torch.nn.Module
    tok: Any
    args: Any  # transformers.TrainingArguments
    data: dict[str, Any]
    callbacks: list[Any]
    group_fn: Callable[[torch.nn.Module], list[dict[str, Any]]] | None
    guard: Any
    method: Any  # the kind's registry entry (spectune.train.methods.Method): its optimizer and step hooks

    def common(self) -> dict[str, Any]:
        """The keyword arguments every SpectralTrainer takes, whatever the recipe."""
        return {"model": self.model, "args": self.args, "train_dataset": self.data["train"],
                "eval_dataset": self.data["validation"], "callbacks": self.callbacks, "group_fn": self.group_fn,
                "guard": self.guard, "method": self.method, "method_config": self.cfg.method}


def map_splits(splits: TextSplits, fn: Callable[[dict[str, list]], dict[str, Any]]) -> dict[str, Any]:
    """``fn`` over every split in batches, the text columns replaced by what it returns."""
    out = {}
    for name in SPLITS:
        ds = getattr(splits, name)
        out[name] = ds.map(fn, batched=True, remove_columns=ds.column_names)
    return out


def needed_splits(cfg: TrainConfig) -> list[str]:
    """Splits that must keep a row: train, the final evaluations', and validation when it is used.

    Validation is evaluated during training, and sizes the training subset evaluated at the end.
    """
    uses_validation = cfg.eval.every != "no" or "train" in cfg.eval.final_splits
    return ["train", *cfg.eval.final_splits] + (["validation"] if uses_validation else [])
