"""KTO (Ethayarajh et al., arXiv:2402.01306) through TRL's KTOTrainer, under a spectral plan like any other run.

KTO learns from unpaired rows: a prompt, one completion, and whether that completion
is desirable. They come from the run's preference pairs (``preference_data``): each
pair gives its chosen reply as a desirable row and its rejected reply as an
undesirable one, so DPO and KTO read the same data and the same splits.

TRL estimates KTO's reference point (the KL term) from mismatched prompt/completion
pairs made by rotating each training batch's completions by one, which needs a fixed,
sequential order (TRL's ``train_sampling_strategy='sequential'``) and at least two rows
a batch. So the rows are shuffled once here, with the run's seed for train (and a
fixed seed for validation and test, which never move with it), mixing desirable and
undesirable rows in every batch and keeping a prompt's two replies apart.

Everything else is the preference recipe's: the model check, the copied
TrainingArguments, the reference (the adapter switched off under PEFT, else a frozen
copy), per-row evaluation figures under each evaluation's prefix, and checkpoints
without TRL's ``ref`` adapter.
"""

from __future__ import annotations

from typing import Any

import datasets
from transformers import TrainingArguments
from trl import KTOConfig, KTOTrainer

from spectune.train.config import TrainConfig
from spectune.train.data import TEST_SEED, TextSplits
from spectune.train.recipes import preference
from spectune.train.recipes._common import TrainerParts
from spectune.train.trainer import SpectralTrainer

UNPAIRED_COLUMNS = ("prompt", "completion", "label")


def splits(cfg: TrainConfig) -> TextSplits:
    """The run's pairs (KTO unpairs them), after the checks a KTO run can fail before any model is loaded."""
    if cfg.method.loss_type in ("sigmoid", "kto") and cfg.train.batch_size < 2:
        raise preference.PreferenceError(
            f"train.batch_size={cfg.train.batch_size}: method.objective=kto estimates its reference point from the other "
            "rows of each batch, so a batch needs at least 2 rows (or loss_type apo_zero_unpaired, which has no KL term)")
    return preference.splits(cfg)


def unpair(pairs: datasets.Dataset, seed: int) -> datasets.Dataset:
    """One desirable row per chosen reply and one undesirable row per rejected reply, shuffled with ``seed``."""
    n = len(pairs)
    rows = datasets.Dataset.from_dict({
        "prompt": list(pairs["prompt"]) * 2,
        "completion": list(pairs["chosen"]) + list(pairs["rejected"]),
        "label": [True] * n + [False] * n,
    })
    return rows.shuffle(seed=seed).flatten_indices()


def inputs(splits: TextSplits, tok: Any, cfg: TrainConfig) -> tuple[dict[str, datasets.Dataset], dict[str, int]]:
    """The preference recipe's rows (pairs with too long a prompt dropped and counted), unpaired for KTO."""
    pairs, skipped = preference.inputs(splits, tok, cfg)
    seeds = {"train": cfg.train.seed, "validation": TEST_SEED, "test": TEST_SEED}
    return {split: unpair(ds, seeds[split]) for split, ds in pairs.items()}, skipped


def kto_args(args: TrainingArguments, cfg: TrainConfig) -> KTOConfig:
    """The run's TrainingArguments as TRL's KTOConfig: beta, the two weights, the loss and its sampling order."""
    m = cfg.method
    loss = "apo_zero_unpaired" if m.loss_type == "apo_zero_unpaired" else "kto"
    common = preference.trl_common(args, cfg)
    if loss == "kto":  # the KL term pairs each row with its neighbour in a fixed order
        common["train_sampling_strategy"] = "sequential"
    return KTOConfig(**common, loss_type=loss, desirable_weight=m.desirable_weight,
                     undesirable_weight=m.undesirable_weight)


class SpectralKTOTrainer(preference.PreferenceMetrics, preference.WithoutRefAdapter, SpectralTrainer, KTOTrainer):
    """TRL's KTOTrainer with the plan's optimizer groups and spectune's callbacks; figures averaged per row."""

    def _metric_store(self) -> dict[str, list[float]]:
        return self._metrics["eval"]

    def _rows_in(self, inputs: dict[str, Any]) -> int:
        return len(inputs["input_ids"])


def trainer(parts: TrainerParts) -> SpectralTrainer:
    """A SpectralKTOTrainer over the run's model, unpaired rows, callbacks and plan groups."""
    kw: dict[str, Any] = {**parts.common(), "args": kto_args(parts.args, parts.cfg), "processing_class": parts.tok}
    return SpectralKTOTrainer(ref_model=preference.reference_model(parts.model), **kw)
