"""What a study reads back from a finished grid cell: its config, base and final weights, fixed batches.

The training engine writes ``final/`` as a whole model (full tuning) or as a PEFT
adapter (LoRA family); both are turned into one plain model here (adapters merged,
``W + BA``) so full and lightweight runs are measured on the same parameter names.
"""

from __future__ import annotations

from typing import Any

import torch

from spectune.analyze.naming import BLOCK_TYPES, layer_index, module_type
from spectune.analyze.sources import canonical_name
from spectune.compare.config import CompareConfig, cell_config, cell_dir
from spectune.compare.grid import Cell
from spectune.train.config import TrainConfig


def group_of(mtype: str) -> str:
    """attention / ffn / embedding / other: the coarse split the seed's layer-wise claims use."""
    if mtype.startswith("attn"):
        return "attention"
    if mtype.startswith("ffn"):
        return "ffn"
    return "embedding" if mtype in ("embedding", "lm_head") else "other"


class CellData:
    """One finished cell: its training config, splits and tokenizer, loaded lazily and once."""

    def __init__(self, cfg: CompareConfig, cell: Cell) -> None:
        self.cell = cell
        self.dir = cell_dir(cfg, cell.task, cell.method, cell.seed)
        self.train_cfg: TrainConfig = cell_config(cfg, cell.task, cell.method, cell.seed)
        self._splits: Any = None

    @property
    def splits(self) -> Any:
        if self._splits is None:
            from spectune.train.data import load_data

            self._splits = load_data(self.train_cfg.data)
        return self._splits

    @property
    def task(self) -> str:
        return self.splits.task if self.train_cfg.model.task == "auto" else self.train_cfg.model.task

    @property
    def num_labels(self) -> int | None:
        return len(self.splits.label_names or []) or None

    def base_model(self) -> tuple[torch.nn.Module, Any]:
        """The model as training started (same head initialisation: the run's seed is set first)."""
        from transformers import set_seed

        from spectune.train.model import load_model

        set_seed(self.train_cfg.train.seed)
        return load_model(self.train_cfg, self.task, self.num_labels)

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        from spectune.analyze.builtin import model_path

        tok = AutoTokenizer.from_pretrained(model_path(self.train_cfg.model.name),
                                            trust_remote_code=self.train_cfg.model.trust_remote_code)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def final_model(self) -> torch.nn.Module:
        """The trained weights as a plain model (a PEFT adapter merged into its base)."""
        final = self.dir / "final"
        if not final.exists():
            raise FileNotFoundError(f"{final} missing: study cells need output.save_final: true")
        if (final / "adapter_config.json").exists():
            from peft import PeftModel

            base, _ = self.base_model()
            model = PeftModel.from_pretrained(base, str(final)).merge_and_unload()
        else:
            from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

            cls = AutoModelForSequenceClassification if self.task == "classification" else AutoModelForCausalLM
            model = cls.from_pretrained(str(final), dtype=torch.float32)
        return _eager(model).eval()

    def batches(self, split: str, n_batches: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """The first ``n_batches * batch_size`` rows of a split, tokenized and collated as in training."""
        from spectune.train.recipes import collator, tokenize

        tok = self.tokenizer()
        data = tokenize(self.splits, tok, self.train_cfg.model.max_length)[split]
        rows = data.select(range(min(len(data), n_batches * batch_size)))
        collate = collator(self.task, tok)
        feats = [rows[i] for i in range(len(rows))]
        return [collate(feats[i : i + batch_size]) for i in range(0, len(feats), batch_size)]


def _eager(model: torch.nn.Module) -> torch.nn.Module:
    """Plain attention: fused CPU attention kernels have no double backward, which Hessian products need."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter("eager")
    elif hasattr(model, "config"):
        model.config._attn_implementation = "eager"
    return model


def matrices(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every 2-D weight by its canonical name, with its module type and block (for joining with analyses)."""
    return {canonical_name(n): p.detach() for n, p in model.named_parameters() if p.ndim == 2}


def describe(name: str) -> dict[str, Any]:
    mtype = module_type(name)
    return {"name": name, "module_type": mtype, "group": group_of(mtype), "layer_index": layer_index(name)}


def landscape_params(model: torch.nn.Module, which: str) -> list[str]:
    """Parameter names the landscape measures act on: block matrices and the head, or every matrix."""
    out = []
    for n, p in model.named_parameters():
        if p.ndim != 2:
            continue
        mtype = module_type(canonical_name(n))
        if which == "all_matrices" or mtype not in ("embedding", "lm_head"):
            out.append(n)
    return out
