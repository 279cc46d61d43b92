"""The end of a run: each split evaluated once, the generalization gaps, and the figures kept apart from timings."""

from __future__ import annotations

from typing import Any

from spectune.train.trainer import SPEED_SUFFIXES

_EVAL_FIELDS = ("rows", "rows_without_targets", "method")


def final_metrics(trainer: Any, data: dict[str, Any], splits: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each split's quality figures (``<split>_loss``, ...) and, apart, its evaluation time and bookkeeping.

    One name per figure: the final evaluations log under ``final_<split>`` (in metrics.jsonl
    the training subset's evaluation would otherwise log a second ``train_runtime``); the
    training subset is as large as the validation split.
    """
    results: dict[str, Any] = {}
    evaluation: dict[str, dict[str, Any]] = {}
    for split in splits:
        ds = data[split] if split != "train" else data["train"].select(range(min(len(data["train"]), len(data["validation"]))))
        prefix = f"final_{split}"
        m = {split + k[len(prefix):]: v for k, v in trainer.evaluate(ds, metric_key_prefix=prefix).items()
             if k.startswith(prefix + "_")}
        evaluation[split] = evaluation_record(m, split, len(ds))
        results.update({k: v for k, v in m.items() if k.startswith(f"{split}_") and is_metric(k, split)})
    return results, evaluation


def generalization_gaps(results: dict[str, Any]) -> dict[str, float]:
    """Train minus test for accuracy and macro-F1 (higher is better), test minus train for loss."""
    gaps = {f"gap_{k}": results[f"train_{k}"] - results[f"test_{k}"]
            for k in ("accuracy", "macro_f1") if f"train_{k}" in results and f"test_{k}" in results}
    if "train_loss" in results and "test_loss" in results:
        gaps["gap_loss"] = results["test_loss"] - results["train_loss"]
    return gaps


def is_metric(key: str, split: str) -> bool:
    """A quality figure of a split (loss, accuracy, perplexity, tokens): not its timing or bookkeeping."""
    rest = key[len(split) + 1:]
    return not key.endswith(SPEED_SUFFIXES) and rest not in _EVAL_FIELDS


def evaluation_record(m: dict[str, Any], split: str, rows: int) -> dict[str, Any]:
    """One split's evaluation time, throughput and bookkeeping, under names that cannot collide with training's."""
    out: dict[str, Any] = {"rows": rows}
    for suffix, name in (("_runtime", "runtime_s"), ("_samples_per_second", "samples_per_second"),
                         ("_steps_per_second", "steps_per_second"), ("_tokens_per_second", "tokens_per_second")):
        if f"{split}{suffix}" in m:
            out[name] = m[f"{split}{suffix}"]
    for f in _EVAL_FIELDS:
        if f"{split}_{f}" in m:
            out[f] = m[f"{split}_{f}"]
    return out
