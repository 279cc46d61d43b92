"""LoKr (Yeh et al., ICLR 2024; LyCORIS): the update is a Kronecker product W1 (x) (W2a W2b) * alpha / r of a small
full factor and a rank-r factor (``decompose_both``: both low-rank), full rank for very few parameters.

A rank plan reaches it as LoRA's does: the plan's targets, ``rank_pattern`` and
``alpha_pattern``. PEFT keeps a factor dense where r is at least half its side, so a
small matrix may show no rank in its shapes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from spectune.train.methods._peft import SIZED_SETS, LycorisConfig, lycoris_sizes, tuner_build
from spectune.train.methods.base import Method


class LoKrConfig(LycorisConfig):
    kind: Literal["lokr"] = "lokr"
    decompose_both: bool = Field(False, description="make the small factor W1 low-rank too")
    decompose_factor: int = Field(-1, description="size of W1's side (-1: the factorisation closest to square)")


METHOD = Method(kind="lokr", config=LoKrConfig, build=tuner_build("LoKrConfig", sizes=lycoris_sizes),
                plan_sets=SIZED_SETS, trains="Kronecker factors", paper="arXiv:2309.14859",
                library="peft.LoKrConfig", mergeable=True,
                memory="adapter: frozen weights + a small dense factor and a rank-r factor per matrix")
