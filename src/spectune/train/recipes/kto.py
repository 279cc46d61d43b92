"""KTO (Ethayarajh et al., arXiv:2402.01306) through TRL's KTOTrainer, under a spectral plan like any other run.

KTO learns from unpaired rows: a prompt, one completion, and whether that completion
is desirable. They come from the run's preference pairs (``preference_data``): each
pair gives its chosen reply as a desirable row and its rejected reply as an
undesirable one, so DPO and KTO read the same data and the same splits. A user file
with TRL's unpaired columns instead (prompt, completion, label) is read as it is, its
test and validation rows carved by prompt as the pairs' are.

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

from pathlib import Path
from typing import Any

import datasets
import numpy as np
from transformers import TrainingArguments
from trl import KTOConfig, KTOTrainer

from spectune.train.config import TrainConfig
from spectune.train.data import TEST_FRACTION, TEST_SEED, DataConfig, DataError, TextSplits, _blank, _read_table, cap_splits
from spectune.train.preference_data import _carve_by_prompt, drop_long_prompts
from spectune.train.recipes import preference
from spectune.train.recipes._common import TrainerParts, needed_splits
from spectune.train.trainer import SpectralTrainer

UNPAIRED_COLUMNS = ("prompt", "completion", "label")
SEEDS = {"validation": TEST_SEED, "test": TEST_SEED}  # evaluation rows in one order whatever train.seed is
FLAGS = {"true": True, "1": True, "false": False, "0": False}


def splits(cfg: TrainConfig) -> TextSplits:
    """The run's unpaired rows (a file of them) or pairs (KTO unpairs them), after the checks a KTO run can fail
    before any model is loaded."""
    if cfg.method.loss_type in ("sigmoid", "kto") and cfg.train.batch_size < 2:
        raise preference.PreferenceError(
            f"train.batch_size={cfg.train.batch_size}: method.objective=kto estimates its reference point from the other "
            "rows of each batch, so a batch needs at least 2 rows (or loss_type apo_zero_unpaired, which has no KL term)")
    rows = unpaired_file(cfg.data)
    if rows is not None:
        preference.check_model(cfg)
        return rows
    return preference.splits(cfg)


def flag(value: Any, where: str) -> bool:
    """A label cell as desirable (True) or not: a boolean, 1 / 0, or the text true / false / 1 / 0."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    key = str(int(value)) if isinstance(value, (int, np.integer)) else str(value).strip().lower()
    if key not in FLAGS:
        raise DataError(f"{where}: label {value!r} is not a desirable flag (true / false, or 1 / 0)")
    return FLAGS[key]


def unpaired_file(cfg: DataConfig) -> TextSplits | None:
    """A user file of unpaired rows (columns prompt, completion, label) as splits, or None for anything else.

    Rows with an empty prompt or completion are dropped and counted; test and validation
    are carved by prompt (a prompt's rows stay in one split), test at the fixed seed.
    """
    path = Path(cfg.path).expanduser() if cfg.path else None
    if path is None or not path.is_file():
        return None
    df = _read_table(path).rename(columns={cfg.prompt_column: "prompt"})
    if not {"completion", "label"} <= set(df.columns) or {"chosen", "rejected"} <= set(df.columns):
        return None
    where = str(path)
    if "prompt" not in df.columns:
        raise DataError(f"{where}: unpaired KTO rows need a prompt column; {cfg.prompt_column!r} not found "
                        f"(columns: {list(df.columns)}; data.prompt_column names another)")
    if cfg.format == "chat":
        raise DataError(f"{where}: unpaired prompt/completion/label rows are read as plain text; data.format: chat "
                        "is for pairs and supervised data")
    bad = _blank(df["prompt"]) | _blank(df["completion"])
    notes = [f"dropped {int(bad.sum())} rows with an empty prompt or completion"] if bad.any() else []
    df = df.loc[~bad, list(UNPAIRED_COLUMNS)].reset_index(drop=True)
    df["label"] = [flag(v, f"{where}: row {i}") for i, v in enumerate(df["label"])]
    df[["prompt", "completion"]] = df[["prompt", "completion"]].astype(str)
    train, test = _carve_by_prompt(df, TEST_FRACTION, TEST_SEED, where)
    train, validation = _carve_by_prompt(train, cfg.validation_fraction, cfg.seed, where)
    train, validation, test, sizes = cap_splits(train, validation, test, cfg, notes)
    parts = {k: datasets.Dataset.from_pandas(v, preserve_index=False) for k, v in
             (("train", train), ("validation", validation), ("test", test))}
    about = f"unpaired KTO rows from {path.name}: {sizes}; test and validation carved by prompt"
    return TextSplits(task="causal_lm", **parts, label_names=None, source=where, description="; ".join([about, *notes]))


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
    """KTO's rows, shuffled once (train with train.seed), with rows or pairs whose prompt fills model.max_length
    dropped and counted: a file's unpaired rows as they are, else the preference recipe's pairs unpaired."""
    seeds = {"train": cfg.train.seed, **SEEDS}
    if "completion" not in splits.train.column_names:
        pairs, skipped = preference.inputs(splits, tok, cfg)
        return {split: unpair(ds, seeds[split]) for split, ds in pairs.items()}, skipped
    preference.check_eos(tok, cfg)
    data = {split: getattr(splits, split) for split in ("train", "validation", "test")}
    skipped = drop_long_prompts(data, tok, cfg.model.max_length, needed_splits(cfg), chat=False)
    return {split: ds.shuffle(seed=seeds[split]).flatten_indices() for split, ds in data.items()}, skipped


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
