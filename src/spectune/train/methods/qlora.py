"""QLoRA (Dettmers et al., NeurIPS 2023): LoRA adapters on a base whose linear weights are stored in 4 bits.

The model is loaded quantized by bitsandbytes (``load_kwargs``), prepared with
PEFT's ``prepare_model_for_kbit_training``, then given LoRA adapters exactly as
the ``lora`` kind does. bitsandbytes runs 4-bit on CPU since its multi-backend
releases (0.50.2 checked: NF4 with double quantisation, forward and LoRA backward).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from spectune.plan import match_names
from spectune.train.methods.base import HEAD_NAMES, BuildContext, Method
from spectune.train.methods.lora import PLAN_SETS, LoraFamilyConfig, lora_config, wrap

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QLoraConfig(LoraFamilyConfig):
    kind: Literal["qlora"] = "qlora"
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes 4-bit data type of the base weights")
    double_quant: bool = Field(True, description="quantize the quantization constants too (about 0.4 bit/weight saved)")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype the 4-bit weights are dequantized to for each matmul")


def load_kwargs(cfg: QLoraConfig, task: str, device: str) -> dict[str, Any]:
    """``from_pretrained`` arguments that quantize while loading; an error naming the reason where 4-bit cannot run.

    Whether the installed bitsandbytes runs 4-bit here is tested on one small tensor,
    so an old or broken install is reported before a model is loaded, not as a
    failure inside the first matmul.
    """
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ValueError("method.kind=qlora needs bitsandbytes, which is not installed: pip install "
                         "'spectune[qlora]' (or pip install bitsandbytes)") from err
    if cfg.compute_dtype == "float16" and device == "cpu":
        raise ValueError("method.compute_dtype=float16: the CPU cannot compute in float16; use bfloat16 or float32")
    try:
        probe = torch.randn(64, 64, device=device)
        packed, state = bnb.functional.quantize_4bit(probe, quant_type=cfg.quant_type,
                                                     compress_statistics=cfg.double_quant)
        bnb.functional.dequantize_4bit(packed, state)
    except Exception as err:  # noqa: BLE001 - any failure means this build cannot quantize here; say why
        raise ValueError(f"method.kind=qlora: bitsandbytes {bnb.__version__} cannot run 4-bit on {device}: "
                         f"{type(err).__name__}: {err}") from err
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type, bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=DTYPES[cfg.compute_dtype],
        # a new classification head starts random and trains in full: it must stay a float matrix
        llm_int8_skip_modules=list(HEAD_NAMES) + ["lm_head"] if task == "classification" else None,
    )
    # bitsandbytes quantizes while loading, on the device it will run on
    return {"quantization_config": quant, "device_map": {"": device}}


def prepare_4bit(model: torch.nn.Module, ctx: BuildContext) -> torch.nn.Module:
    """A 4-bit model made ready for LoRA: PEFT's own preparation.

    ``prepare_model_for_kbit_training`` freezes the base, keeps the remaining float
    parameters (norms, embeddings, head) in float32 for stable updates and lets the
    input embeddings pass gradients. Gradient checkpointing stays off, as in every other
    method here. A plan that trains a 4-bit matrix in full cannot be followed (packed
    bytes have no gradient): that is refused, naming the matrices.
    """
    import peft

    if not getattr(model, "is_loaded_in_4bit", False):
        raise ValueError("method.kind=qlora: the model was not loaded in 4-bit (load it through spectune.train's "
                         "load_model, which passes the bitsandbytes config)")
    plan = ctx.plan
    if plan is not None and plan.trainable:
        names = [n for n, _ in model.named_parameters()]
        packed = {n for n, p in model.named_parameters() if not p.dtype.is_floating_point}
        hit = sorted(m for m in match_names(plan.trainable, names).values() if m in packed)
        if hit:
            raise ValueError(
                f"method.kind=qlora: the plan trains {len(hit)} 4-bit matrices in full ({', '.join(hit[:3])}"
                f"{', ...' if len(hit) > 3 else ''}), but quantized weights have no gradient; use method.kind=lora, "
                "or a plan whose trainable set holds only unquantized matrices")
    keep_cpu_4bit_differentiable(model)
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def keep_cpu_4bit_differentiable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference at the first evaluation.

    On a CPU with AVX512-BF16, bitsandbytes (0.50.2) converts a ``Linear4bit`` weight to
    an inference layout on its first eval-mode forward and never converts it back; the
    training steps after that evaluation then run ``gemv_4bit``, which has no autograd
    kernel, so the gradient through every base matmul is silently wrong (torch only
    warns). Turning the module's switch off keeps the training layout throughout.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def build(model: torch.nn.Module, cfg: QLoraConfig, ctx: BuildContext) -> torch.nn.Module:
    model = prepare_4bit(model, ctx)
    return wrap(model, lora_config(model, cfg, ctx), ctx)


METHOD = Method(kind="qlora", config=QLoraConfig, build=build, plan_sets=PLAN_SETS, trains="LoRA adapters on a 4-bit base",
                memory="quantized adapter: 4-bit weights (about 0.5 byte a parameter) + LoRA adapters",
                paper="arXiv:2305.14314", library="peft.LoraConfig + transformers.BitsAndBytesConfig",
                mergeable=True, load_kwargs=load_kwargs)
