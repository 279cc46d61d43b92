"""OFT (Qiu et al., NeurIPS 2023): each adapted weight is multiplied by a learned block-diagonal orthogonal matrix
(Cayley parametrised), which keeps the angles between its neurons (hyperspherical energy).

Give either ``oft_block_size`` (PEFT's default, 32) or ``r`` (the number of blocks),
the other 0. One block size for every matrix: a rank plan is refused.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from spectune.train.methods._peft import WEIGHT_SETS, tuner_build
from spectune.train.methods.base import Method, TargetedBase


class OFTConfig(TargetedBase):
    kind: Literal["oft"] = "oft"
    r: int = Field(0, ge=0, description="number of orthogonal blocks (0: from oft_block_size)")
    oft_block_size: int = Field(32, ge=0, description="size of each orthogonal block (0: from r)")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="probability a whole adapter is skipped in a step")
    coft: bool = Field(False, description="constrained OFT: keep the rotation within eps of the identity")
    eps: float = Field(6e-5, gt=0, description="coft's bound")
    block_share: bool = Field(False, description="one orthogonal block shared along the diagonal")
    use_cayley_neumann: bool = Field(True, description="Neumann series for the Cayley inverse (faster)")
    num_cayley_neumann_terms: int = Field(5, ge=1)

    @model_validator(mode="after")
    def _one_size(self) -> "OFTConfig":
        """PEFT takes exactly one of r and oft_block_size; saying which here beats its message mid-build."""
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ValueError(f"method.r={self.r} and method.oft_block_size={self.oft_block_size}: set exactly one of "
                             "them, the other 0 (PEFT's default is oft_block_size 32, r 0)")
        return self


METHOD = Method(kind="oft", config=OFTConfig, build=tuner_build("OFTConfig"), plan_sets=WEIGHT_SETS,
                trains="block-diagonal orthogonal rotations", paper="arXiv:2306.07280", library="peft.OFTConfig",
                memory="adapter: frozen weights + b(b-1)/2 per block of size b per matrix", mergeable=True)
