"""LoHa (FedPara, Hyeon-Woo et al., ICLR 2022; LyCORIS): the update is the Hadamard product of two rank-r
products, (W1a W1b) * (W2a W2b) * alpha / r, of rank up to r^2 for 2r(in + out) parameters.

A rank plan reaches it as LoRA's does: the plan's targets, ``rank_pattern`` and
``alpha_pattern`` (PEFT's names, matched to the task model's modules).
"""

from __future__ import annotations

from typing import Literal

from spectune.train.methods._peft import SIZED_SETS, LycorisConfig, lycoris_sizes, tuner_build
from spectune.train.methods.base import Method


class LoHaConfig(LycorisConfig):
    kind: Literal["loha"] = "loha"


METHOD = Method(kind="loha", config=LoHaConfig, build=tuner_build("LoHaConfig", sizes=lycoris_sizes),
                plan_sets=SIZED_SETS, trains="Hadamard products of low-rank pairs", paper="arXiv:2108.06098",
                library="peft.LoHaConfig", mergeable=True,
                memory="adapter: frozen weights + 2r(in + out) per matrix")
