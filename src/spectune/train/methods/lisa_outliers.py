"""OwLore's layer score for LISA's draw: each block's outlier ratio from its weights and calibration activations.

OwLore (Li et al., Findings of ACL 2025, arXiv:2405.18380) samples LISA's blocks with
probability proportional to their layerwise outlier distribution (LOD), the score OWL
(Yin et al., ICML 2024, arXiv:2310.05175) defines for pruning:

  A_ij = |W_ij| * ||X_j||_2     (Wanda's importance: weight times the l2 norm of input feature j
                                 over the calibration tokens)
  LOD_b = #{A_ij > M * mean(A)} / #A   over every linear layer of block b together

with M the outlier threshold. OwLore's released scores are cached under the name
``llama2_7b_ratio_13``, so M = 13 is the default here (the paper text does not restate it).
Calibration tokens are the run's first ``calibration_batches`` training batches, fed one
row at a time without padding (as the data-driven LoRA initialisations read them).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from spectune.analyze.naming import layer_index
from spectune.train.methods.lora_init import forward_rows


def outlier_ratio(importances: Iterable[torch.Tensor], threshold: float) -> float:
    """LOD of one block: the share of all its importance entries above ``threshold`` times their joint mean."""
    flat = torch.cat([a.reshape(-1).double() for a in importances])
    if flat.numel() == 0:
        return 0.0
    return float((flat > threshold * flat.mean()).double().mean())


def input_norms(model: torch.nn.Module, linears: dict[str, torch.nn.Linear],
                batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every input feature j of each linear layer, over every token of ``batches`` (forward hooks;
    the batches run a row at a time without padding, in eval mode)."""
    sums = {name: torch.zeros(layer.in_features, dtype=torch.float64) for name, layer in linears.items()}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def add(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            sums[name] += (x.double() ** 2).sum(dim=0).cpu()
        return add

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in linears.items()]
    was_training = model.training
    try:
        model.eval()
        forward_rows(model, batches)()
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {name: s.sqrt() for name, s in sums.items()}


def block_outlier_ratios(model: torch.nn.Module, block_ids: list[int],
                         batches: list[dict[str, torch.Tensor]], threshold: float) -> np.ndarray:
    """LOD_b of each block in ``block_ids`` (the model's block indices), from the calibration ``batches``."""
    linears = {name: mod for name, mod in model.named_modules()
               if type(mod) is torch.nn.Linear and layer_index(f"{name}.weight") in block_ids}
    norms = input_norms(model, linears, batches)

    def ratio(block: int) -> float:  # one block's importances at a time: float64 copies of every matrix would not fit
        names = [n for n in linears if layer_index(f"{n}.weight") == block]
        return outlier_ratio((linears[n].weight.detach().abs().double().cpu() * norms[n].unsqueeze(0) for n in names),
                             threshold)

    return np.array([ratio(b) for b in block_ids])
