"""HRA (Yuan et al., NeurIPS 2024): each adapted weight is multiplied by a chain of r learned Householder reflections.

The update is orthogonal (it rotates the weight's input space), so the weight's
singular values are kept; ``apply_GS`` orthogonalises the reflection vectors
(Gram-Schmidt) for a strictly orthogonal chain. Every adapted matrix gets the same
``r``: a rank plan has no per-module size to set here and is refused.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from spectune.train.methods._peft import WEIGHT_SETS, tuner_build
from spectune.train.methods.base import Method, TargetedBase


class HRAConfig(TargetedBase):
    kind: Literal["hra"] = "hra"
    r: int = Field(8, ge=1, description="Householder reflections per adapted matrix (even r: PEFT's identity init)")
    apply_GS: bool = Field(False, description="Gram-Schmidt orthogonalise the reflection vectors")


METHOD = Method(kind="hra", config=HRAConfig, build=tuner_build("HRAConfig"), plan_sets=WEIGHT_SETS,
                trains="Householder reflection vectors", paper="arXiv:2405.17484", library="peft.HRAConfig",
                memory="adapter: frozen weights + r vectors of the input size per matrix", mergeable=True)
