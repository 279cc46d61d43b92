"""A trained run as one standard Hugging Face model folder: adapters merged into the base, tokenizer beside it.

What users take away from a fine-tune (axolotl's ``merge_lora``, PEFT's
``merge_and_unload``). The base is loaded as the run loaded it; for QLoRA the
4-bit base is dequantized first (transformers' ``dequantize``), so the merged
weights are exactly what the adapted model computed with, and the adapters are
merged in float, never re-quantized. A run that trained every weight (full, BitFit,
or a switched run, whose final/ is already merged) is saved as it is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from spectune.train.config import TrainConfig, load_config, stored_config_yaml
from spectune.train.methods import lora_convert, merge_problem


class MergeError(ValueError):
    """A run that cannot be merged; the message names the reason and the setting."""


def run_config(run_dir: Path) -> TrainConfig:
    """The config a run was trained with (its config.yaml, read through today's schema)."""
    import yaml

    stored = run_dir / "config.yaml"
    if not stored.exists():
        raise MergeError(f"{run_dir} is not a spectune run folder (no config.yaml)")
    return load_config(yaml.safe_load(stored_config_yaml(stored.read_text())))


def head_labels(adapter_dir: Path) -> int | None:
    """The number of labels of a classification run: the output size of its saved task head (the last head
    module by name, ``classifier`` or ``score``; ``pre_classifier`` is hidden to hidden)."""
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        for head in ("classifier", "score"):
            for key in f.keys():
                parts = key.split(".")
                if parts[-1] == "weight" and head in parts and "pre_classifier" not in parts:
                    return int(f.get_slice(key).get_shape()[0])
    return None


def _base(cfg: TrainConfig, task: str, num_labels: int | None) -> tuple[torch.nn.Module, Any]:
    from spectune.train.model import load_model

    model, tok = load_model(cfg, task, num_labels)
    if getattr(model, "is_loaded_in_4bit", False):
        model = model.dequantize()  # the 4-bit weights the adapters were trained against, in float
    return model, tok


def merged_model(run_dir: Path, task: str | None = None) -> tuple[torch.nn.Module, Any]:
    """The run's final model with every adapter merged, and its tokenizer (from the run's final/ folder)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cfg = run_config(run_dir)
    final = run_dir / "final"
    if not final.is_dir():
        raise MergeError(f"{run_dir} has no final/ folder (the run did not finish, or output.save_final was off)")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    task = task or summary.get("task")
    if task is None:
        raise MergeError(f"{run_dir} has no summary.json saying its task (classification or causal_lm)")
    if not (final / "adapter_config.json").exists():  # full, BitFit, a switched run: already a plain model
        cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
        return cls.from_pretrained(str(final), dtype=torch.float32), AutoTokenizer.from_pretrained(str(final))
    problem = merge_problem(cfg.method)
    init = str(getattr(cfg.method, "init", "default"))
    if not problem and lora_convert.rewrites_base(init) and not (final / lora_convert.CONVERTED).exists():
        problem = (f"method.init={init} rewrote the frozen base, and {final} holds the adapter over that rewritten "
                   "base (trained before spectune converted such adapters): retrain, or load it with peft over W_res")
    if problem:
        raise MergeError(problem)
    tok = AutoTokenizer.from_pretrained(str(final))
    base, _ = _base(cfg, task, head_labels(final) if task == "classification" else None)
    model = PeftModel.from_pretrained(base, str(final))
    return model.merge_and_unload(), tok


def export_merged(run_dir: Path, out: Path, task: str | None = None) -> Path:
    """Write the merged model and its tokenizer to ``out`` as a standard Hugging Face folder (safetensors)."""
    model, tok = merged_model(Path(run_dir), task)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)  # the folder is written whole elsewhere first: never half a model at out
    tmp.rename(out)
    return out
