"""Loading the model a run trains: its dtype (checked against the hardware), its tokenizer, and a kind's load options."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from spectune.analyze.builtin import ALIASES, model_path
from spectune.train.config import TrainConfig
from spectune.train.methods import METHODS

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device() -> str:
    """Where this process trains: its CUDA device under a launcher, else the CPU (as the Trainer decides)."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def _supports(dtype: torch.dtype, device: str) -> bool:
    """Whether the hardware trains in ``dtype``: float16 needs CUDA (CPU kernels and the Trainer's loss scaler
    do not cover it), bfloat16 runs on every CPU torch supports and on CUDA devices that report it."""
    if dtype == torch.float32:
        return True
    if device == "cpu":
        return dtype == torch.bfloat16
    return dtype == torch.float16 or torch.cuda.is_bf16_supported()


def resolve_dtype(cfg: TrainConfig, path: str, device: str | None = None) -> torch.dtype:
    """The dtype the weights are loaded in, from ``model.dtype``; refuses what this hardware cannot train.

    ``auto`` takes the checkpoint's own dtype (its config's ``dtype`` / ``torch_dtype``)
    where the hardware runs it, else float32 with a warning naming both (a float16
    checkpoint on CPU). An explicit request the hardware cannot run is an error naming
    ``model.dtype``: training would otherwise fail later in a kernel with a message that
    says nothing about the config.
    """
    import warnings

    from transformers import AutoConfig

    device = device or _device()
    want = cfg.model.dtype
    if want == "auto":
        conf = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        stored = getattr(conf, "dtype", None) or getattr(conf, "torch_dtype", None)
        dtype = getattr(torch, stored) if isinstance(stored, str) else stored
        if dtype not in _DTYPES.values():
            return torch.float32
        if not _supports(dtype, device):
            warnings.warn(f"model.dtype auto: the checkpoint is {str(dtype).removeprefix('torch.')}, which {device} "
                          "cannot train; loading it in float32 instead", stacklevel=2)
            return torch.float32
        return dtype
    dtype = _DTYPES[want]
    if not _supports(dtype, device):
        raise ValueError(f"model.dtype={want}: {device} cannot train in {want} (float16 needs a CUDA GPU, bfloat16 a "
                         "GPU that supports it); use bfloat16 or float32 on CPU, or auto")
    return dtype


def load_model(cfg: TrainConfig, task: str, num_labels: int | None) -> tuple[torch.nn.Module, Any]:
    """The task model in ``model.dtype`` (4-bit base weights under qlora) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = model_path(cfg.model.name)
    if not Path(path).exists():
        raise FileNotFoundError(f"model not found: {cfg.model.name} (neither an alias {sorted(ALIASES)} nor a folder)")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if cfg.data.format == "chat":
        from spectune.train.chat import ensure_template

        ensure_template(tok, cfg.model.chat_template, cfg.model.name)
    elif cfg.model.chat_template is not None:
        tok.chat_template = cfg.model.chat_template  # saved with final/ for generation, though plain data ignores it
    device = _device()
    kw: dict[str, Any] = {"trust_remote_code": cfg.model.trust_remote_code, "dtype": resolve_dtype(cfg, path, device)}
    hook = METHODS[cfg.method.kind].load_kwargs
    if hook is not None:  # qlora: quantize while loading
        kw.update(hook(cfg.method, task, device))
    if task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kw)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    return model, tok
