"""P-tuning (Liu et al., 2021, "GPT Understands, Too"): ``num_virtual_tokens`` virtual token embeddings produced by
a small prompt encoder (an MLP or LSTM) and prepended to the input; no weight trains.

PEFT's ``PromptEncoderConfig``. Works for causal LMs and classifiers (the embeddings
go in front of the input, so any model taking ``inputs_embeds`` can use it). No plan
applies. Checkpoints keep the whole encoder (``PromptEncoderState``): PEFT's own
adapter file holds only the prompt it outputs, enough for inference but not to resume.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from spectune.train.methods._peft import PromptEncoderState, prompt_build
from spectune.train.methods.base import Method, MethodBase


class PTuningConfig(MethodBase):
    kind: Literal["p_tuning"] = "p_tuning"
    num_virtual_tokens: int = Field(16, ge=1, description="virtual tokens before the input")
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = Field("MLP", description="the prompt encoder")
    encoder_hidden_size: int | None = Field(None, ge=1,
                                            description="the encoder's width (None: the model's hidden size)")
    encoder_num_layers: int = Field(2, ge=1, description="LSTM layers (PEFT fixes the MLP's depth)")
    encoder_dropout: float = Field(0.0, ge=0, lt=1)


METHOD = Method(kind="p_tuning", config=PTuningConfig, build=prompt_build("PromptEncoderConfig"),
                plan_sets=frozenset(), trains="virtual tokens from a prompt encoder", paper="arXiv:2103.10385",
                library="peft.PromptEncoderConfig", callbacks=lambda cfg, ctx: [PromptEncoderState()],
                memory="prompt: num_virtual_tokens x hidden + the encoder (a few hidden x hidden matrices)")
