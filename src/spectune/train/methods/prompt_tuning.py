"""Prompt tuning (Lester et al., EMNLP 2021): trainable virtual token embeddings before the input; no weight trains."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from spectune.train.methods.base import BuildContext, Method, MethodBase, peft_common


class PromptTuningConfig(MethodBase):
    kind: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(16, ge=1)


def build(model: torch.nn.Module, cfg: PromptTuningConfig, ctx: BuildContext) -> torch.nn.Module:
    import peft

    return peft.get_peft_model(model, peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens,
                                                              **peft_common(ctx)))


METHOD = Method(kind="prompt_tuning", config=PromptTuningConfig, build=build, plan_sets=frozenset(), trains="virtual token embeddings",
                memory="prompt: num_virtual_tokens x hidden", paper="arXiv:2104.08691",
                library="peft.PromptTuningConfig")
