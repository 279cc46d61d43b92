"""A base-rewriting LoRA init's trained adapter as a standard adapter of the checkpoint it was loaded from.

PiSSA, OLoRA, MiLoRA, CorDA and LoRA-GA start by moving part of each weight into the
adapter: the frozen base becomes W_res = W - s B0 A0 (s = lora_alpha / r). After training
the layer computes W_res + s B A, so the saved adapter belongs to W_res, which no
checkpoint holds. Over the checkpoint's W the same layer is

    W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0],

a plain LoRA adapter of rank 2r at the same scaling (lora_alpha doubled with r; with
rsLoRA, where s = alpha / sqrt(r), by sqrt 2). This is peft's own conversion
(``save_pretrained(path_initial_model_for_weight_conversion=...)``, its
``subtract_mutated_init``), done here on the saved files so that the rest of the adapter
(a classification head under ``modules_to_save``), which peft's conversion drops, is kept.

The build keeps a CPU copy of B0 and A0 right after the init (``ctx.notes[INITIAL]``: a
resumed run builds again from the checkpoint's W, so it holds the factors its own W_res
came from) and the run rewrites final/ when it ends; ``CONVERTED`` in final/ says it was. final/ then loads with
``PeftModel.from_pretrained`` over the unchanged checkpoint and merges like any LoRA run.
LoftQ is not converted: its base is the NF4 round trip of W, not W minus the adapter, so
W + s (B A - B0 A0) is only approximately what it trained.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from spectune import _io

INITIAL = "initial_lora_factors"  # BuildContext.notes key: B0 and A0 as peft names them in a saved adapter
CONVERTED = "converted_from_init.json"  # in final/: the init the adapter was converted from, and its rank then
SAFETENSORS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def rewrites_base(init: str) -> bool:
    """Whether ``method.init`` starts by rewriting the frozen weights (W_res = W - s B0 A0, or LoftQ's quantized W)."""
    from spectune.train.methods.lora_init import BASE_REWRITING

    return init.startswith("pissa") or init in ("olora", *BASE_REWRITING)


def convertible(init: str, dora: bool = False) -> bool:
    """Whether the run's final adapter is converted to one over the checkpoint (every rewriting init but LoftQ,
    and not under DoRA, whose magnitudes are taken from W_res)."""
    return rewrites_base(init) and init != "loftq" and not dora


def lora_factors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's A and B matrices, under the names a saved adapter gives them (peft's state-dict naming)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}


def difference_factors(trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """[A ; A0] and [B | -B0] for every factor in ``initial``: their product is B A - B0 A0 (tensors in, tensors out)."""
    missing = sorted(set(initial) - set(trained))
    if missing:
        raise ValueError(f"the trained adapter lacks {len(missing)} of the initial factors, e.g. {missing[0]}")
    out = {}
    for name, first in initial.items():
        now = trained[name]
        out[name] = torch.cat([now, first.to(now.dtype)], dim=0) if ".lora_A." in name \
            else torch.cat([now, -first.to(now.dtype)], dim=1)
    return out


def doubled_config(config: dict[str, Any]) -> dict[str, Any]:
    """The adapter config of the rank-2r difference: the same scaling, no init left to run when it is loaded."""
    out = dict(config)
    grow = math.sqrt(2.0) if out.get("use_rslora") else 2.0
    out["r"] = 2 * out["r"]
    out["lora_alpha"] = out["lora_alpha"] * grow
    out["rank_pattern"] = {k: 2 * v for k, v in (out.get("rank_pattern") or {}).items()}
    out["alpha_pattern"] = {k: v * grow for k, v in (out.get("alpha_pattern") or {}).items()}
    out["init_lora_weights"] = True
    for key in ("corda_config", "eva_config", "loftq_config", "lora_ga_config"):
        if out.get(key):
            out[key] = None if key != "loftq_config" else {}
    return out


def convert_final(final: Path, initial: dict[str, torch.Tensor], init: str) -> None:
    """Rewrite final/'s adapter as the standard one over the checkpoint, from the ``initial`` factors (module
    docstring); each file atomically."""
    config = json.loads((final / CONFIG).read_text())
    trained = load_file(str(final / SAFETENSORS))
    converted = {**trained, **difference_factors(trained, initial)}
    with _io.atomic_path(final / SAFETENSORS) as tmp:
        save_file(converted, str(tmp), metadata={"format": "pt"})
    _io.write_text(final / CONFIG, json.dumps(doubled_config(config), indent=2, sort_keys=True))
    _io.write_json(final / CONVERTED, {"init": init, "r": config["r"], "lora_alpha": config["lora_alpha"],
                                       "note": "B A - B0 A0 as a rank-2r adapter over the unchanged checkpoint"})
