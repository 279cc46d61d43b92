"""Preference tuning (DPO, ORPO, CPO, SimPO) through TRL's trainers, under a spectral plan like any supervised run.

The preference recipe of ``spectune.train.run``: the same stages as the supervised
recipes, with three things its own, all here: the data (pairs, not token blocks),
the Trainer's arguments (TRL's config classes) and the Trainer class.

Why subclasses with ``SpectralTrainer`` first in the method order rather than a
second trainer: the plan's optimizer groups (``create_optimizer``), the stop on a
non-finite loss, evaluation that leaves the training's random streams alone and the
RNG-isolated callback handler (re-planning, spectral tracking, metrics.jsonl) are then
the very code supervised runs use, while TRL keeps what is its own: tokenizing the
pairs, the collator, the reference model and the loss. Python's cooperative
``super()`` chains them: SpectralTrainer -> TRL's trainer -> transformers.Trainer.

The reference model of DPO: with a PEFT method TRL disables (a frozen copy of) the
adapter, so no second model is held; otherwise the reference is a frozen copy of
the model as loaded, made here, since TRL would reload it from a hub id that an
in-memory or converted model does not have. ORPO, CPO and SimPO need none.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import TrainingArguments
from trl import DPOConfig, DPOTrainer
from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from spectune.analyze.builtin import model_path
from spectune.train.config import TrainConfig
from spectune.train.data import TextSplits
from spectune.train.preference_data import drop_long_prompts, load_preference_data, trl_rows
from spectune.train.recipes._common import TrainerParts, needed_splits
from spectune.train.trainer import SpectralTrainer

DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "cpo": 0.1, "simpo": 2.0, "kto": 0.1}  # TRL's; SimPO's paper uses 2.0-2.5
CAUSAL_LM_CLASSES = ("ForCausalLM", "LMHeadModel")
REF_ADAPTER = "ref"  # the name TRL gives its frozen copy of a PEFT model's adapter
PRIMARY_METRIC = "accuracy"  # <split>_accuracy: the share of pairs whose chosen reply out-scores the rejected one


class PreferenceError(ValueError):
    """A preference objective asked of a model or tokenizer that cannot run it; the message names the setting."""


# --- data -----------------------------------------------------------------------------------------


def check_model(cfg: TrainConfig) -> None:
    """Refuse a model that is not a causal LM before it is loaded (a BERT would load with a random LM head)."""
    from transformers import AutoConfig

    path = model_path(cfg.model.name)
    if not Path(path).exists():
        return  # load_model names the missing model
    conf = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    archs = list(getattr(conf, "architectures", None) or [])
    if getattr(conf, "is_encoder_decoder", False) or (archs and not any(a.endswith(CAUSAL_LM_CLASSES) for a in archs)):
        raise PreferenceError(
            f"method.objective={cfg.method.objective}: model {cfg.model.name!r} ({', '.join(archs) or conf.model_type}) "
            "is not a causal language model; preference tuning scores each reply token by token with a language-model "
            "head (use a decoder such as smollm2-135m)")


def splits(cfg: TrainConfig) -> TextSplits:
    """The run's pairs, after checking the model can be preference-tuned at all."""
    check_model(cfg)
    return load_preference_data(cfg.data)


def check_eos(tok: Any, cfg: TrainConfig) -> None:
    """Plain replies need an end-of-sequence token: TRL appends it so the model learns where a reply ends."""
    if cfg.data.format != "chat" and tok.eos_token is None:
        raise PreferenceError(
            f"method.objective={cfg.method.objective}: the tokenizer of model {cfg.model.name!r} has no eos_token, which "
            "TRL appends to every reply so the model learns where a reply ends; use a tokenizer with one, or "
            "data.format: chat with a chat template")


def inputs(splits: TextSplits, tok: Any, cfg: TrainConfig) -> tuple[dict[str, datasets.Dataset], dict[str, int]]:
    """Each split as TRL's rows (TRL tokenizes them itself) and how many pairs were dropped for a too-long prompt."""
    chat = cfg.data.format == "chat"
    check_eos(tok, cfg)
    data = {split: getattr(splits, split) for split in ("train", "validation", "test")}
    skipped = drop_long_prompts(data, tok, cfg.model.max_length, needed_splits(cfg), chat)
    return {split: trl_rows(ds, chat) for split, ds in data.items()}, skipped


# --- arguments ------------------------------------------------------------------------------------


def trl_common(args: TrainingArguments, cfg: TrainConfig) -> dict[str, Any]:
    """Every TrainingArguments field of the run, plus the settings all of TRL's preference configs share.

    Every field is copied, so the schedule, evaluation, saving and distributed
    settings are the supervised run's (and follow any change made to
    ``training_arguments``); TRL's differing defaults (learning rate 1e-6, gradient
    checkpointing, bf16) never apply, because each field is given.
    """
    base = {f.name: getattr(args, f.name) for f in fields(TrainingArguments) if f.init}
    m = cfg.method
    return {**base, "max_length": cfg.model.max_length,
            "beta": m.beta if m.beta is not None else DEFAULT_BETA[m.objective]}


def preference_args(args: TrainingArguments, cfg: TrainConfig) -> TrainingArguments:
    """The run's TrainingArguments as the objective's TRL config (``trl_common``), plus its own settings."""
    common = trl_common(args, cfg)
    m = cfg.method
    if m.objective == "dpo":
        losses = [m.loss_type] if isinstance(m.loss_type, str) else list(m.loss_type)
        return DPOConfig(**common, loss_type=losses, loss_weights=m.loss_weights, label_smoothing=m.label_smoothing)
    if m.objective == "orpo":
        return ORPOConfig(**common)
    simpo = m.objective == "simpo"
    return CPOConfig(**common, loss_type="simpo" if simpo else str(m.loss_type),
                     cpo_alpha=0.0 if simpo else m.cpo_alpha, simpo_gamma=m.simpo_gamma, label_smoothing=m.label_smoothing)


# --- trainers -------------------------------------------------------------------------------------


def pairs_in(inputs: dict[str, Any]) -> int:
    """Pairs in a collated batch: DPO stacks chosen over rejected in ``input_ids``; ORPO/CPO keep them apart."""
    if "chosen_input_ids" in inputs:
        return len(inputs["chosen_input_ids"])
    return len(inputs["input_ids"]) // 2


def eval_figures(store: dict[str, list[float]], rows: list[int], prefix: str) -> dict[str, float]:
    """TRL's per-batch evaluation figures as per-pair means under ``prefix``, plus ``<prefix>_accuracy``.

    TRL averages batch means, which over-weights a short last batch; weighting each by
    its pairs gives the figure over the split. ``accuracy`` is TRL's
    ``rewards/accuracies`` under a name ``spectune compare`` ranks (higher is better).
    """
    out: dict[str, float] = {}
    for key, values in store.items():
        name = key.removeprefix("eval_")
        if name == "num_tokens" or not values:  # DPO's count of training tokens so far, not an evaluation figure
            continue
        weights = rows if len(rows) == len(values) else None
        out[f"{prefix}_{name}"] = float(np.average(np.asarray(values, dtype=float), weights=weights))
    if f"{prefix}_rewards/accuracies" in out:
        out[f"{prefix}_{PRIMARY_METRIC}"] = out[f"{prefix}_rewards/accuracies"]
    return out


class PreferenceMetrics:
    """Evaluation figures (rewards, margins, accuracies, log-probabilities) under the evaluation's own prefix.

    TRL logs them as ``eval_*`` whatever ``metric_key_prefix`` was asked for, so the
    final evaluations of train, validation and test would overwrite one another.
    """

    _eval_prefix: str | None = None
    _eval_rows: list[int]

    def _metric_store(self) -> dict[str, list[float]]:
        """Where the TRL trainer accumulates the current evaluation's per-batch figures."""
        raise NotImplementedError

    def _prepared(self, dataset: Any) -> Any:
        """A dataset given to ``evaluate`` made ready for the trainer (DPO does this itself)."""
        return dataset

    def _rows_in(self, inputs: dict[str, Any]) -> int:
        """The rows a batch's figures average over (pairs; KTO's unpaired rows)."""
        return pairs_in(inputs)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        self._eval_prefix, self._eval_rows = metric_key_prefix, []
        try:
            return super().evaluate(self._prepared(eval_dataset), ignore_keys, metric_key_prefix)  # type: ignore[misc]
        finally:
            self._eval_prefix = None

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> Any:
        if self._eval_prefix is not None:
            self._eval_rows.append(self._rows_in(inputs))
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)  # type: ignore[misc]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._eval_prefix is not None:
            store = self._metric_store()
            logs.update(eval_figures(store, self._eval_rows, self._eval_prefix))
            store.clear()  # TRL's own log then adds nothing under its fixed eval_ prefix
        super().log(logs, start_time)  # type: ignore[misc]


class WithoutRefAdapter:
    """Checkpoints and final/ keep the trained adapter alone, not TRL's frozen ``ref`` copy of the initial one.

    DPO and KTO add that copy to a PEFT model as their reference and PEFT saves every
    adapter, the extra ones in sub-folders; the copy is rebuilt the same way when a run
    resumes, and a user loading final/ should find one adapter, theirs.
    """

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        super()._save(output_dir, state_dict)  # type: ignore[misc]
        args = self.args  # type: ignore[attr-defined]
        ref = Path(output_dir if output_dir is not None else args.output_dir) / REF_ADAPTER
        if args.should_save and REF_ADAPTER in (getattr(self.model, "peft_config", None) or {}) and ref.is_dir():  # type: ignore[attr-defined]
            shutil.rmtree(ref)


class SpectralDPOTrainer(PreferenceMetrics, WithoutRefAdapter, SpectralTrainer, DPOTrainer):
    """TRL's DPOTrainer (all its loss types) with the plan's optimizer groups and spectune's callbacks."""

    def _metric_store(self) -> dict[str, list[float]]:
        return self._metrics["eval"]


class _OddsRatioFamily(PreferenceMetrics):
    """ORPO and CPO share TRL's older trainer layout: metrics in ``_stored_metrics``, pairs tokenized at init only."""

    def _metric_store(self) -> dict[str, list[float]]:
        return self._stored_metrics["eval"]  # type: ignore[attr-defined]

    def _prepared(self, dataset: Any) -> Any:
        # the same three maps TRL's __init__ runs on its eval_dataset
        if not isinstance(dataset, datasets.Dataset) or "chosen_input_ids" in dataset.column_names:
            return dataset
        tok = self.processing_class  # type: ignore[attr-defined]
        dataset = dataset.map(maybe_extract_prompt).map(maybe_apply_chat_template, fn_kwargs={"processing_class": tok})
        return dataset.map(self.tokenize_row)  # type: ignore[attr-defined]


class SpectralORPOTrainer(_OddsRatioFamily, SpectralTrainer, ORPOTrainer):
    """TRL's ORPOTrainer (odds-ratio preference loss added to the chosen reply's NLL; no reference model)."""


class SpectralCPOTrainer(_OddsRatioFamily, SpectralTrainer, CPOTrainer):
    """TRL's CPOTrainer: CPO, and SimPO (its length-normalised, reference-free loss with a target margin)."""


def reference_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """DPO's reference: None under PEFT (TRL switches the adapter off), else a frozen copy of the untrained model.

    AdaLoRA allows a single trainable adapter, so TRL cannot add its frozen copy of one:
    its reference is the model with the untrained adapter merged, a plain model again.
    """
    from peft import PeftModel, PeftType

    if isinstance(model, PeftModel):
        if model.peft_config[model.active_adapter].peft_type != PeftType.ADALORA:
            return None
        ref = copy.deepcopy(model).merge_and_unload()
    else:
        ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def trainer(parts: TrainerParts) -> SpectralTrainer:
    """The objective's Spectral*Trainer over the run's model, pairs, callbacks and plan groups."""
    cfg = parts.cfg
    kw: dict[str, Any] = {**parts.common(), "args": preference_args(parts.args, cfg), "processing_class": parts.tok}
    objective = cfg.method.objective
    if objective == "dpo":
        return SpectralDPOTrainer(ref_model=reference_model(parts.model), **kw)
    if objective == "orpo":
        return SpectralORPOTrainer(**kw)
    return SpectralCPOTrainer(**kw)
