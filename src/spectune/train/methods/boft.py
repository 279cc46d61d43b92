"""BOFT (Liu et al., ICLR 2024): OFT whose orthogonal matrix is a product of ``boft_n_butterfly_factor`` sparse
butterfly factors of ``boft_block_size`` blocks (plus a trained output scale), dense with few parameters.

Give ``boft_block_size`` or ``boft_block_num``, the other 0. One size for every
matrix: a rank plan is refused. More than one butterfly factor needs PEFT's ``fbd``
CUDA extension (it compiles where CUDA, ninja and CUDA_HOME are present); without it
PEFT silently falls back to one factor, so that is refused here naming the setting.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from spectune.train.methods._peft import WEIGHT_SETS, tuner_build
from spectune.train.methods.base import BuildContext, Method, TargetedBase


class BOFTConfig(TargetedBase):
    kind: Literal["boft"] = "boft"
    boft_block_size: int = Field(4, ge=0, description="size of each orthogonal block (0: from boft_block_num)")
    boft_block_num: int = Field(0, ge=0, description="number of blocks (0: from boft_block_size)")
    boft_n_butterfly_factor: int = Field(1, ge=1, description="butterfly factors (1: plain block-diagonal OFT)")
    boft_dropout: float = Field(0.0, ge=0, lt=1, description="probability a whole block is left out in a step")

    @model_validator(mode="after")
    def _one_size(self) -> "BOFTConfig":
        """PEFT takes exactly one of boft_block_size and boft_block_num."""
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ValueError(f"method.boft_block_size={self.boft_block_size} and method.boft_block_num="
                             f"{self.boft_block_num}: set exactly one of them, the other 0")
        return self


_tuner = tuner_build("BOFTConfig")


def build(model: torch.nn.Module, cfg: BOFTConfig, ctx: BuildContext) -> torch.nn.Module:
    if cfg.boft_n_butterfly_factor > 1:
        from peft.tuners.boft.layer import get_fbd_cuda

        if not get_fbd_cuda():
            raise ValueError(f"method.boft_n_butterfly_factor={cfg.boft_n_butterfly_factor} needs PEFT's fbd CUDA "
                             "extension, which does not build here (CUDA, ninja, CUDA_HOME); PEFT would silently "
                             "use 1 factor: set boft_n_butterfly_factor: 1")
    return _tuner(model, cfg, ctx)


METHOD = Method(kind="boft", config=BOFTConfig, build=build, plan_sets=WEIGHT_SETS,
                trains="butterfly orthogonal factors and an output scale", paper="arXiv:2311.06243",
                library="peft.BOFTConfig", mergeable=True,
                memory="adapter: frozen weights + factors x blocks x b^2 + out per matrix")
