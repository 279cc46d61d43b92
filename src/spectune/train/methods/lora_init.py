"""LoRA initialisations that read the run's data or the weights' smallest singular directions.

- ``eva`` (Paischer et al., arXiv:2410.07170): A from the top right-singular vectors of each
  layer's *inputs* on the run's own batches, B = 0 (``peft.initialize_lora_eva_weights``);
- ``corda`` (Yang et al., arXiv:2406.05223): adapters from the SVD of each weight times the
  covariance of its inputs (``peft.tuners.lora.corda.preprocess_corda``, instruction-previewed mode);
- ``lora_ga`` (Wang et al., arXiv:2407.05000): A and B from the SVD of each weight's gradient,
  averaged over the batches (``peft.preprocess_loraga``);
- ``loftq`` (Li et al., arXiv:2310.08659): the base replaced by its NF4 round trip and the adapters
  set to the low-rank quantization residual (``peft.LoftQConfig``); reads no data;
- ``milora`` (Wang et al., arXiv:2406.09044): PiSSA's construction on the *smallest* r singular
  triplets. Not in peft, so written here: ``minor_factors`` is the math, ``apply_milora`` the surgery.

The data-driven ones take the first ``method.init_batches`` training batches, in the
split's order at the training batch size (the same batches for the same run), and
``init.json`` in the run folder records what they read and how long they took.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from spectune import _io
from spectune.train.methods.base import BuildContext

DATA_INITS = ("eva", "corda", "lora_ga")  # built from the run's own training batches
BASE_REWRITING = ("corda", "lora_ga", "loftq", "milora")  # change the frozen base weight (W_res = W - scaling BA)
OWN_INITS = ("milora",)  # not peft's init_lora_weights values: built here after peft's default init


@dataclass
class Calibration:
    """The training batches an initialisation reads, and how much text that is."""

    batches: list[dict[str, torch.Tensor]]
    rows: int
    tokens: int


def calibration(ctx: BuildContext, init: str, count: int) -> Calibration:
    """The first ``count`` collated training batches, or a one-line error naming ``method.init`` and the reason."""
    if ctx.train_batches is None:
        raise ValueError(
            f"method.init={init} is built from the run's training batches, and this run collates none (a preference "
            "objective's pairs are tokenized by TRL inside its trainer); use an init that reads no data (default, "
            "pissa, olora, milora, ...) or objective sft")
    # a collator's BatchEncoding is a UserDict; peft's EVA accepts plain dicts only
    batches = [dict(b) for b in itertools.islice(iter(ctx.train_batches()), count)]
    if not batches:
        raise ValueError(f"method.init={init} is built from the run's training batches, and the training split has "
                         "no rows; give the data a training split")
    rows = sum(len(b["input_ids"]) for b in batches)
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    return Calibration(batches=batches, rows=rows, tokens=tokens)


def peft_settings(init: str, task: str, plan_ranks: bool) -> dict[str, Any]:
    """``LoraConfig`` keyword arguments for ``init``: peft's init name and its sub-config.

    EVA may move rank between layers (peft's ``rho`` = 2: a layer up to twice ``r``);
    under a plan that sets the ranks it may not (``rho`` = 1), so the plan's ranks hold.
    Its label mask (skip prompt tokens) reads per-token labels, which a classifier's
    batches do not have.
    """
    import peft

    if init == "eva":
        eva = peft.EvaConfig(rho=1.0 if plan_ranks else 2.0, use_label_mask=task != "classification")
        return {"init_lora_weights": "eva", "eva_config": eva}
    if init == "corda":
        from peft.tuners.lora.config import CordaConfig

        return {"init_lora_weights": "corda", "corda_config": CordaConfig(corda_method="ipm")}
    if init == "lora_ga":
        return {"init_lora_weights": "lora_ga", "lora_ga_config": peft.LoraGAConfig()}
    if init == "loftq":
        return {"init_lora_weights": "loftq", "loftq_config": peft.LoftQConfig(loftq_bits=4, loftq_iter=1)}
    if init in OWN_INITS:
        return {"init_lora_weights": True}
    return {"init_lora_weights": True if init == "default" else init}


def check_loftq() -> None:
    """LoftQ where peft can run it, else why not (peft 0.21.2 quantizes every weight on 'cuda' or 'xpu')."""
    if not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())):
        raise ValueError("method.init=loftq cannot run here: peft's LoftQ (peft.utils.loftq_utils.loftq_init) quantizes "
                         "each weight with bitsandbytes on a CUDA or XPU device, and this machine has neither; use a "
                         "GPU, or init pissa / milora")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ValueError("method.init=loftq needs bitsandbytes for its NF4 round trip: pip install bitsandbytes") from err


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def rows(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """A collated batch as one-row inputs with their padding cut away (labels dropped: only activations are read)."""
    mask = batch.get("attention_mask")
    out = []
    for i in range(len(batch["input_ids"])):
        keep = mask[i].bool() if mask is not None else None
        row = {}
        for key, value in batch.items():
            if key == "labels" or not isinstance(value, torch.Tensor):
                continue
            value = value[i:i + 1]
            row[key] = value[:, keep] if keep is not None and value.dim() == 2 and value.shape[1] == len(keep) else value
        out.append(row)
    return out


def forward_rows(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> Callable[[], None]:
    """A callback running the model over every row of the batches, one at a time and without padding.

    CorDA's hooks read one sequence per forward (peft squeezes a batch of one) and
    add its input covariance, so pad tokens must not be in it.
    """

    @torch.no_grad()
    def run() -> None:
        for batch in batches:
            for row in rows(batch):
                model(**_on(row, _device(model)))

    return run


def backward_all(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> Callable[[], None]:
    """A callback accumulating the loss gradient over every batch (LoRA-GA averages it per target weight)."""

    def run() -> None:
        for batch in batches:
            model(**_on(batch, _device(model))).loss.backward()

    return run


def prepare(model: torch.nn.Module, config: Any, init: str, data: Calibration | None) -> int:
    """What peft needs before ``get_peft_model`` (CorDA's covariance eigens, LoRA-GA's gradients, LoftQ's device);
    returns the forward passes it ran (CorDA: one a row; LoRA-GA: one a batch, each with its backward)."""
    if init == "corda":
        from peft.tuners.lora.corda import preprocess_corda

        assert data is not None
        preprocess_corda(model, config, run_model=forward_rows(model, data.batches))
        return data.rows
    if init == "lora_ga":
        import peft

        assert data is not None
        peft.preprocess_loraga(model, config, train_step=backward_all(model, data.batches))
        return len(data.batches)
    if init == "loftq":
        check_loftq()
    return 0


def finish(model: torch.nn.Module, init: str, data: Calibration | None) -> int:
    """What runs after ``get_peft_model``: EVA's data pass, MiLoRA's SVD; returns EVA's forward passes (else 0).

    EVA repeats its batches until each layer's components settle (peft cycles the
    loader), so its forward passes can exceed the batches it was given.
    """
    if init == "eva":
        import peft

        assert data is not None
        passes = [0]

        def forward(m: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
            passes[0] += 1
            return m(**inputs)

        peft.initialize_lora_eva_weights(model, dataloader=data.batches, forward_fn=forward, show_progress_bar=False)
        return passes[0]
    if init == "milora":
        apply_milora(model)
    return 0


def record(ctx: BuildContext, init: str, asked: int, data: Calibration | None, passes: int, seconds: float) -> None:
    """run_dir/init.json: the initialisation, the batches it was asked for and read, their rows and tokens, its time,
    and whether it rewrote the base weights (then final/'s adapter belongs to W_res, not to the loaded base)."""
    if ctx.run_dir is None or os.environ.get("RANK", "0") != "0":
        return
    used = len(data.batches) if data is not None else 0
    _io.write_json(ctx.run_dir / "init.json", {
        "init": init, "init_batches": asked if data is not None else 0, "batches_used": used,
        "rows": data.rows if data is not None else 0, "tokens": data.tokens if data is not None else 0,
        "forward_passes": passes, "seconds": round(seconds, 3), "base_rewritten": init in BASE_REWRITING})


def initialise(model: torch.nn.Module, config: Any, init: str, ctx: BuildContext, batches: int,
               wrap: Callable[[torch.nn.Module, Any], torch.nn.Module]) -> torch.nn.Module:
    """``wrap`` (peft's ``get_peft_model`` and the plan's trainable set) with ``init``'s steps before and after.

    Inits peft runs inside ``get_peft_model`` (default, pissa, olora, ...) pass straight through.
    """
    if init not in DATA_INITS + BASE_REWRITING:
        return wrap(model, config)
    t = time.perf_counter()
    data = calibration(ctx, init, batches) if init in DATA_INITS else None
    passes = prepare(model, config, init, data)
    model = wrap(model, config)
    passes += finish(model, init, data)
    record(ctx, init, batches, data, passes, time.perf_counter() - t)
    return model


# --- MiLoRA -----------------------------------------------------------------------------------------


def minor_factors(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, W_res) of MiLoRA for a weight ``W`` (out x in): the adapter holds W's r smallest singular triplets.

    With W = U diag(s) V^T and the last r triplets (U_r, s_r, V_r):
    A = diag(sqrt(s_r / scaling)) V_r^T (r x in), B = U_r diag(sqrt(s_r / scaling)) (out x r),
    W_res = W - scaling * B A, so W_res + scaling * B A = W and the function is unchanged at
    step 0. The SVD runs in float64: the smallest directions are the worst conditioned.
    """
    if not 1 <= r <= min(weight.shape):
        raise ValueError(f"MiLoRA rank {r} must be between 1 and min{tuple(weight.shape)}")
    w = weight.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = torch.sqrt(s[-r:] / scaling)
    a = root[:, None] * vh[-r:]
    b = u[:, -r:] * root[None, :]
    return a, b, w - scaling * (b @ a)


@torch.no_grad()
def apply_milora(model: torch.nn.Module, adapter: str = "default") -> int:
    """Set every LoRA layer's A, B from its base weight's smallest triplets and its base to W_res; returns the count.

    Each layer's own rank and scaling are read from the layer (a plan's ``rank_pattern`` holds).
    """
    from peft.tuners.lora import LoraLayer

    done = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        base = module.get_base_layer()
        flip = bool(getattr(module, "fan_in_fan_out", False))  # GPT-2's Conv1D stores W as (in, out)
        weight = base.weight.T if flip else base.weight
        a, b, residual = minor_factors(weight, module.r[adapter], float(module.scaling[adapter]))
        lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        lora_a.copy_(a.to(lora_a.dtype))
        lora_b.copy_(b.to(lora_b.dtype))
        base.weight.copy_((residual.T if flip else residual).to(base.weight.dtype))
        done += 1
    return done
