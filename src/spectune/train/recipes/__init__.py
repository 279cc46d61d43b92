"""One recipe per objective, each a module with the same parts: ``inputs`` and ``trainer`` (and ``splits`` where
the objective reads its own data).

- ``classification``: labelled text, a task head, accuracy and macro-F1;
- ``causal_lm``: language modelling and SFT (blocks, prompt/response, chat), per-token NLL;
- ``preference``: prompt/chosen/rejected pairs through TRL's trainers (dpo, orpo, cpo, simpo);
- ``kto``: the same pairs as unpaired desirable / undesirable rows through TRL's KTOTrainer.

``spectune.train.run`` calls the stages in order and asks the recipe only for what differs.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from spectune.train.config import TrainConfig
from spectune.train.data import TextSplits
from spectune.train.recipes import causal_lm, classification
from spectune.train.recipes._common import TrainerParts

SUPERVISED: dict[str, ModuleType] = {"classification": classification, "causal_lm": causal_lm}


def objective_recipe(cfg: TrainConfig) -> ModuleType | None:
    """The recipe an objective fixes before any data is read (preference), or None: the data's task decides."""
    if cfg.method.objective == "sft":
        return None
    if cfg.method.objective == "kto":
        from spectune.train.recipes import kto

        return kto
    from spectune.train.recipes import preference  # TRL is imported only by runs that use it

    return preference


def task_recipe(task: str) -> ModuleType:
    return SUPERVISED[task]


def tokenize(splits: TextSplits, tok: Any, max_length: int, fmt: str = "plain") -> dict[str, Any]:
    """The supervised recipes' token ids for ``splits`` (by its task), for callers outside a run (studies, benches)."""
    if splits.task == "classification":
        return classification.tokenize(splits, tok, max_length)
    return causal_lm.tokenize(splits, tok, max_length, fmt)


def collator(task: str, tok: Any) -> Any:
    return task_recipe(task).collator(tok)


__all__ = ["TrainerParts", "objective_recipe", "task_recipe", "tokenize", "collator", "SUPERVISED"]
