"""The classification recipe: labelled text, a new task head, accuracy and macro-F1."""

from __future__ import annotations

from typing import Any

import numpy as np

from spectune.train.config import TrainConfig
from spectune.train.data import TextSplits
from spectune.train.recipes._common import TrainerParts, map_splits


def tokenize(splits: TextSplits, tok: Any, max_length: int) -> dict[str, Any]:
    """Token ids (truncated to ``max_length``) and the label of every row."""
    def rows(batch: dict[str, list]) -> dict[str, Any]:
        out = tok(batch["text"], truncation=True, max_length=max_length)
        out["labels"] = batch["label"]
        return out

    return map_splits(splits, rows)


def inputs(splits: TextSplits, tok: Any, cfg: TrainConfig) -> tuple[dict[str, Any], dict[str, int]]:
    """The tokenized splits; no row is dropped (every row has its label)."""
    return tokenize(splits, tok, cfg.model.max_length), {}


def collator(tok: Any) -> Any:
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tok)


def compute_metrics(pred: Any) -> dict[str, float]:
    from sklearn.metrics import f1_score

    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    y = np.argmax(logits, axis=-1)
    return {"accuracy": float((y == pred.label_ids).mean()), "macro_f1": float(f1_score(pred.label_ids, y, average="macro"))}


def trainer(parts: TrainerParts) -> Any:
    from spectune.train.trainer import SpectralTrainer

    trainer = SpectralTrainer(**parts.common(), data_collator=collator(parts.tok), compute_metrics=compute_metrics)
    # the classification loss is a per-batch mean that ignores num_items_in_batch: without this the
    # Trainer multiplies it by the number of processes (and skips the division by grad_accum)
    trainer.model_accepts_loss_kwargs = False
    return trainer
