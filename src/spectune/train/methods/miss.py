"""MiSS / Bone (Kang, 2024; PEFT's MissConfig): one shared r x out block per weight, added to every r-column
shard of it, so the update ties the weight's shards together with r x out parameters.

``init_weights``: True is MiSS's balanced default, ``bat`` Bone's nonlinear update
across shards (needs in and out divisible by r), ``mini`` a smaller block of ``mini_r``.
One ``r`` for every matrix: a rank plan is refused.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from spectune.train.methods._peft import WEIGHT_SETS, tuner_build
from spectune.train.methods.base import Method, TargetedBase


class MissConfig(TargetedBase):
    kind: Literal["miss"] = "miss"
    r: int = Field(64, ge=1, description="block rows: the shard width the weight is split into")
    miss_dropout: float = Field(0.0, ge=0, lt=1)
    init_weights: bool | Literal["bat", "mini"] = Field(True, description="True: MiSS; bat: Bone; mini: mini_r blocks")
    mini_r: int = Field(1, ge=1, description="with init_weights: mini, the block's width (out must divide by it)")


METHOD = Method(kind="miss", config=MissConfig, build=tuner_build("MissConfig"), plan_sets=WEIGHT_SETS,
                trains="a shared block per matrix", paper="arXiv:2409.15371", library="peft.MissConfig",
                memory="adapter: frozen weights + r x out per matrix", mergeable=True)
