"""VeRA (Kopiczko et al., ICLR 2024): one pair of frozen random matrices A (r x in), B (out x r) shared by every
layer; each adapted matrix trains two scaling vectors, the update being diag(b) B diag(d) A.

``r`` is the shared matrices' rank, one for all layers: a rank plan is refused.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from spectune.train.methods._peft import WEIGHT_SETS, tuner_build
from spectune.train.methods.base import Method, TargetedBase


class VeraConfig(TargetedBase):
    kind: Literal["vera"] = "vera"
    r: int = Field(256, ge=1, description="rank of the shared random matrices")
    vera_dropout: float = Field(0.0, ge=0, lt=1)
    d_initial: float = Field(0.1, description="initial value of the d scaling vector (b starts at 0)")
    projection_prng_key: int = Field(0, description="seed of the shared random matrices")


METHOD = Method(kind="vera", config=VeraConfig, build=tuner_build("VeraConfig"), plan_sets=WEIGHT_SETS,
                trains="scaling vectors of shared random matrices", paper="arXiv:2310.11454",
                library="peft.VeraConfig", mergeable=True,
                memory="vectors: frozen weights + shared random A, B (buffers) + out + r entries per matrix")
