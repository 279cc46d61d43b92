"""What the PEFT tuner kinds share: their settings passed to PEFT under PEFT's own names, and a rank plan as sizes.

Each kind's config holds only PEFT's fields for that tuner (same names, same
defaults), so building is one call: ``peft.<Tuner>Config(**own_settings(cfg), ...)``.
A rank plan (adaptive-rank, layer-pattern) reaches a kind with per-module sizes
through a ``sizes`` function that turns the plan's targets and ranks into the
tuner's own patterns (LoHa/LoKr ``rank_pattern``, FourierFT ``n_frequency_pattern``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from transformers import TrainerCallback

from spectune.plan import Plan, match_names, peft_kwargs
from spectune.train.methods.base import (RATES, RANKS, TRAINABLE, BuildContext, MethodBase, TargetedBase, peft_common,
                                         targets)
from spectune.train.methods.lora import wrap

# a kind that trains weight matrices through adapters: per-matrix rates and a plan's trainable set; with RANKS also
# per-module sizes from a rank plan
WEIGHT_SETS = frozenset({RATES, TRAINABLE})
SIZED_SETS = frozenset({RATES, RANKS, TRAINABLE})
_SHARED = set(TargetedBase.model_fields) | set(MethodBase.model_fields) | {"kind"}



class LycorisConfig(TargetedBase):
    """Settings LoHa and LoKr share (PEFT's ``LycorisConfig`` names and defaults)."""

    r: int = Field(8, ge=1, description="rank of the low-rank factors (a rank plan's default rank replaces it)")
    alpha: float = Field(8, gt=0, description="the update is scaled by alpha / r")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="dropout over the update's rows")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="probability a whole adapter is skipped in a step")


Sizes = Callable[[torch.nn.Module, Any, Plan], dict[str, Any]]
Build = Callable[[torch.nn.Module, Any, BuildContext], torch.nn.Module]


def own_settings(cfg: MethodBase) -> dict[str, Any]:
    """The kind's own settings by PEFT's names: every field of its config that the shared bases do not define."""
    return {k: getattr(cfg, k) for k in type(cfg).model_fields if k not in _SHARED}


def planned_modules(model: torch.nn.Module, plan: Plan) -> dict[str, str]:
    """The plan's adapter targets mapped to the model's own module names (a task model adds ``bert.`` etc.)."""
    assert plan.lora is not None
    names = match_names([t + ".weight" for t in plan.lora.target_modules], [n for n, _ in model.named_parameters()])
    return {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in names.items()}


def lycoris_sizes(model: torch.nn.Module, cfg: Any, plan: Plan) -> dict[str, Any]:
    """LoHa/LoKr sizes from a rank plan: its targets, default rank and alpha, and per-module ``rank_pattern`` and
    ``alpha_pattern`` (LyCORIS scales by alpha / r exactly as LoRA does, so the plan's alphas carry over)."""
    kw = peft_kwargs(plan, planned_modules(model, plan))
    return {"r": kw["r"], "alpha": kw["lora_alpha"], "target_modules": kw["target_modules"],
            "rank_pattern": kw["rank_pattern"], "alpha_pattern": kw["alpha_pattern"]}


def tuner_build(config_name: str, sizes: Sizes | None = None) -> Build:
    """The build of a PEFT tuner kind: ``peft.<config_name>`` over the kind's settings and targets (or, under a
    rank plan, the plan's targets and sizes through ``sizes``), then ``get_peft_model`` and the plan's trainable set."""

    def build(model: torch.nn.Module, cfg: Any, ctx: BuildContext) -> torch.nn.Module:
        import peft

        kw = own_settings(cfg)
        kw["target_modules"] = targets(model, cfg)
        if sizes is not None and ctx.plan is not None and ctx.plan.lora is not None:
            kw.update(sizes(model, cfg, ctx.plan))
        return wrap(model, getattr(peft, config_name)(**kw, **peft_common(ctx)), ctx)

    return build


def prompt_build(config_name: str) -> Build:
    """The build of a PEFT prompt-learning kind: ``peft.<config_name>`` over the kind's settings; no weight trains."""

    def build(model: torch.nn.Module, cfg: Any, ctx: BuildContext) -> torch.nn.Module:
        import peft

        return peft.get_peft_model(model, getattr(peft, config_name)(**own_settings(cfg), **peft_common(ctx)))

    return build


class PromptEncoderState(TrainerCallback):
    """Checkpoints keep the whole prompt encoder, and a resumed run continues from it.

    For P-tuning (and prefix tuning's projection) PEFT saves only the encoder's output,
    the prompt embeddings, which is all inference needs; a resume loading that would
    restart the encoder from its initialisation and train a different model. The
    encoder's own state goes beside PEFT's adapter file in each checkpoint and is put
    back when training resumes.
    """

    FILE = "prompt_encoder.safetensors"

    @staticmethod
    def _encoder(model: Any) -> torch.nn.Module:
        return model.prompt_encoder[model.active_adapter]

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None or not state.is_world_process_zero:
            return
        from safetensors.torch import save_file

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        tensors = {k: v.detach().contiguous().cpu() for k, v in self._encoder(model).state_dict().items()}
        save_file(tensors, str(folder / self.FILE))

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.FILE
        if model is not None and state.global_step > 0 and path.exists():
            from safetensors.torch import load_file

            self._encoder(model).load_state_dict(load_file(str(path)))
