"""RandLoRA (Albert et al., ICLR 2025): a full-rank update from fixed random low-rank bases shared by all layers,
of which only small diagonal scalings (``randlora_lambda``, ``randlora_gamma``) train.

``r`` is the rank of each random basis (min(in, out) / r bases make the update full
rank); it is one size for every matrix, so a rank plan is refused.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from spectune.train.methods._peft import WEIGHT_SETS, tuner_build
from spectune.train.methods.base import Method, TargetedBase


class RandLoraConfig(TargetedBase):
    kind: Literal["randlora"] = "randlora"
    r: int = Field(32, ge=1, description="rank of each random basis (fewer bases, fewer parameters, as r grows)")
    randlora_alpha: float = Field(640, gt=0, description="scale of the update (PEFT: about 20 x r)")
    randlora_dropout: float = Field(0.0, ge=0, lt=1)
    projection_prng_key: int = Field(0, description="seed of the shared random bases")
    sparse: bool = Field(False, description="ternary sparse random bases (density 1/6)")
    very_sparse: bool = Field(False, description="sparser bases (density 1/sqrt(min(in, out)))")


METHOD = Method(kind="randlora", config=RandLoraConfig, build=tuner_build("RandLoraConfig"), plan_sets=WEIGHT_SETS,
                trains="scalings of shared random bases", paper="arXiv:2502.00987", library="peft.RandLoraConfig",
                memory="vectors: frozen weights + shared random bases (buffers) + two small scalings per matrix",
                mergeable=True)
