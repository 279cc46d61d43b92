"""Prefix tuning (Li & Liang, ACL 2021): trainable key/value prefixes of ``num_virtual_tokens`` positions at every
attention layer, fed to the model as past key values; no weight trains.

PEFT passes the prefixes to the model as ``past_key_values``. For causal LMs that
works (transformers 5.25 still accepts the argument, deprecated in favour of ``cache``
and announced for removal in 5.40, after which PEFT must follow); for classification
PEFT needs a backbone whose forward names ``past_key_values``, which no model in
transformers 5 does (BERT, Llama, Qwen2 checked), so classification is refused naming
the model class (p_tuning or prompt_tuning prepend embeddings instead and work there).
``prefix_projection`` reparametrises the prefixes through a two-layer MLP of width
``encoder_hidden_size``, as the paper does for stability; checkpoints then keep the
MLP too (``PromptEncoderState``: PEFT saves only the prefixes it outputs). No plan
applies.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from spectune.train.methods._peft import PromptEncoderState, prompt_build
from spectune.train.methods.base import BuildContext, Method, MethodBase


class PrefixTuningConfig(MethodBase):
    kind: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(16, ge=1, description="prefix positions at every layer")
    prefix_projection: bool = Field(False, description="reparametrise the prefixes through an MLP (the paper's)")
    encoder_hidden_size: int | None = Field(None, ge=1, description="with prefix_projection: the MLP's width "
                                            "(None: the model's hidden size)")


_peft_build = prompt_build("PrefixTuningConfig")


def build(model: torch.nn.Module, cfg: PrefixTuningConfig, ctx: BuildContext) -> torch.nn.Module:
    if ctx.task != "causal_lm":
        raise ValueError(f"method.kind=prefix_tuning runs on causal-LM data: for {ctx.task} PEFT feeds the prefixes "
                         f"through past_key_values, which {type(model).__name__}.forward does not take in "
                         "transformers 5; use kind p_tuning or prompt_tuning")
    return _peft_build(model, cfg, ctx)


METHOD = Method(kind="prefix_tuning", config=PrefixTuningConfig, build=build, plan_sets=frozenset(),
                trains="key/value prefixes", paper="arXiv:2101.00190", library="peft.PrefixTuningConfig",
                callbacks=lambda cfg, ctx: [PromptEncoderState()] if cfg.prefix_projection else [],
                memory="prompt: num_virtual_tokens x layers x 2 x hidden (key and value prefixes)")
