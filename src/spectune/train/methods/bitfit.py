"""BitFit (Ben Zaken et al., ACL 2022): only the bias terms (and a new task head) train."""

from __future__ import annotations

from typing import Any, Literal

import torch

from spectune.train.methods.base import RATES, BuildContext, Method, MethodBase


class BitFitConfig(MethodBase):
    kind: Literal["bitfit"] = "bitfit"


def build(model: torch.nn.Module, cfg: Any, ctx: BuildContext) -> torch.nn.Module:
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith(".bias") or n.split(".")[0] in ctx.heads)
    return model


METHOD = Method(kind="bitfit", config=BitFitConfig, build=build, plan_sets=frozenset({RATES}), trains="the biases",
                memory="biases: about 0.1% of the weights train", paper="arXiv:2106.10199", library="torch", mergeable=True)
