"""Fine-tuning methods: turn a base model into the set of weights that will train.

Full fine-tuning and BitFit touch requires_grad only; LoRA-family methods,
AdaLoRA, IA3 and prompt tuning go through PEFT. A plan with LoRA decisions
(adaptive-rank, stable-rank) supplies the targets and per-module ranks, and a
plan's ``trainable`` list chooses which base matrices train in full.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from spectune.plan import Plan, apply_trainable, match_names, peft_kwargs
from spectune.train.config import MethodConfig

# linear layers inside the blocks, by the names the common families use
DEFAULT_TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|query|key|value|dense|c_attn|c_proj|c_fc)$"
PEFT_KINDS = {"lora", "rslora", "dora", "qlora", "adalora", "ia3", "prompt_tuning"}
HEAD_NAMES = ("classifier", "score", "pre_classifier")  # new task heads, by the names the common families use


def task_type(task: str) -> str:
    return "SEQ_CLS" if task == "classification" else "CAUSAL_LM"


def head_modules(model: torch.nn.Module, task: str) -> list[str]:
    """Freshly initialised task heads that must train even when the base is frozen."""
    if task != "classification":
        return []
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    return [h for h in HEAD_NAMES if h in names]


def _targets(model: torch.nn.Module, cfg: MethodConfig) -> list[str] | str:
    if cfg.target_modules is not None:
        return cfg.target_modules
    # only nn.Linear modules inside transformer blocks (not the pooler or the head)
    pattern = re.compile(DEFAULT_TARGETS)
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear,)) and pattern.match(n) and re.search(r"\.(layer|layers|h)\.\d+\.", n)
    ]
    try:
        from transformers.pytorch_utils import Conv1D

        names += [n for n, m in model.named_modules() if isinstance(m, Conv1D) and pattern.match(n)]
    except ImportError:  # pragma: no cover
        pass
    return sorted(set(names))


def apply_method(model: torch.nn.Module, cfg: MethodConfig, task: str, plan: Plan | None,
                 total_steps: int) -> torch.nn.Module:
    """The model ready to train: PEFT-wrapped where the method asks, requires_grad set."""
    heads = head_modules(model, task) if cfg.train_head else []
    if cfg.kind == "full":
        model.requires_grad_(True)
    elif cfg.kind == "frozen":
        model.requires_grad_(False)
    elif cfg.kind == "bitfit":
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith(".bias") or n.split(".")[0] in heads)
    elif cfg.kind in PEFT_KINDS:
        if cfg.kind == "qlora":
            model = _prepare_4bit(model, plan)
        model = _peft(model, cfg, task, plan, heads, total_steps)
    else:  # pragma: no cover - pydantic restricts kind
        raise ValueError(cfg.kind)
    if plan is not None and plan.trainable is not None:
        if cfg.kind == "full" or cfg.kind in PEFT_KINDS:
            _train_planned_matrices(model, plan)
    return model


def _prepare_4bit(model: torch.nn.Module, plan: Plan | None) -> torch.nn.Module:
    """A 4-bit model (loaded with bitsandbytes by the trainer) made ready for LoRA: PEFT's own preparation.

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
    if plan is not None and plan.trainable:
        names = [n for n, _ in model.named_parameters()]
        packed = {n for n, p in model.named_parameters() if not p.dtype.is_floating_point}
        hit = sorted(m for m in match_names(plan.trainable, names).values() if m in packed)
        if hit:
            raise ValueError(
                f"method.kind=qlora: the plan trains {len(hit)} 4-bit matrices in full ({', '.join(hit[:3])}"
                f"{', ...' if len(hit) > 3 else ''}), but quantized weights have no gradient; use method.kind=lora, "
                "or a plan whose trainable set holds only unquantized matrices")
    _keep_cpu_4bit_differentiable(model)
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _keep_cpu_4bit_differentiable(model: torch.nn.Module) -> None:
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


def _train_planned_matrices(model: torch.nn.Module, plan: Plan) -> None:
    """Matrices the plan trains in full; the rest of the plan's matrices are frozen."""
    adapters = {n for n, p in model.named_parameters() if p.requires_grad and ("lora_" in n or "modules_to_save" in n)}
    apply_trainable(model, plan)
    for n, p in model.named_parameters():  # adapters and heads added by PEFT keep training
        if n in adapters:
            p.requires_grad_(True)


def _init(cfg: MethodConfig) -> bool | str:
    """PEFT's ``init_lora_weights`` for ``method.init`` (``default``: PEFT's own, B = 0)."""
    return True if cfg.init == "default" else cfg.init


def _peft(model: torch.nn.Module, cfg: MethodConfig, task: str, plan: Plan | None, heads: list[str],
          total_steps: int) -> torch.nn.Module:
    import peft

    common: dict[str, Any] = {"task_type": task_type(task)}
    if heads:
        common["modules_to_save"] = heads
    kind = cfg.kind
    if kind in ("lora", "rslora", "dora", "qlora"):
        if plan is not None and plan.lora is not None:
            names = match_names([t + ".weight" for t in plan.lora.target_modules], [n for n, _ in model.named_parameters()])
            rename = {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in names.items()}
            kw = peft_kwargs(plan, rename)
            kw["use_rslora"] = kw["use_rslora"] or kind == "rslora"
            kw["use_dora"] = kw["use_dora"] or kind == "dora"
            config = peft.LoraConfig(**kw, lora_dropout=cfg.lora_dropout, init_lora_weights=_init(cfg), **common)
        else:
            config = peft.LoraConfig(
                r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=_targets(model, cfg),
                use_rslora=kind == "rslora", use_dora=kind == "dora", init_lora_weights=_init(cfg), **common,
            )
    elif kind == "adalora":
        config = peft.AdaLoraConfig(
            init_r=cfg.r, target_r=cfg.adalora_target_r, lora_alpha=cfg.lora_alpha, target_modules=_targets(model, cfg),
            total_step=max(total_steps, 1), tinit=max(total_steps // 10, 0), tfinal=max(total_steps // 5, 0), **common,
        )
    elif kind == "ia3":
        targets = _targets(model, cfg)
        ff = [t for t in targets if re.search(r"(up_proj|down_proj|dense|c_fc|fc)", t) and "attention" not in t] if isinstance(targets, list) else None
        config = peft.IA3Config(target_modules=targets, feedforward_modules=ff, **common)
    else:  # prompt_tuning
        config = peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)
    return peft.get_peft_model(model, config)


@dataclass
class SwitchAdapters:
    """LoRA adapters injected up front for the matrices a time-aware run may switch (see ``inject_switch_adapters``).

    ``modules`` maps each switchable matrix (its plan/analysis name) to its base weight's
    model name (``<module>.base_layer.weight``) and its adapter parameters' names.
    """

    tuner: Any  # the peft LoraModel that injected them; its merge_and_unload() gives the plain model back
    modules: dict[str, tuple[str, list[str]]]

    def parameter_names(self) -> list[str]:
        """Every parameter a switch touches (base weights and adapters): the optimizer holds them all from the start."""
        return [n for base, adapters in self.modules.values() for n in [base, *adapters]]

    def adapter_names(self) -> list[str]:
        """The dormant adapters' parameters alone (they train at ``plan.switch_lr_ratio`` x their layer's rate)."""
        return [n for _, adapters in self.modules.values() for n in adapters]


def inject_switch_adapters(model: torch.nn.Module, plan: Plan, light: dict[str, str], dropout: float = 0.0) -> SwitchAdapters:
    """Give every lightweight matrix a dormant LoRA adapter of the plan's rank, in place.

    The adapters come from PEFT's ``LoraModel`` (the plan's ``peft_kwargs``: rank and alpha
    per matrix; DoRA is off, since its magnitude would stop tracking a base weight that
    still trains). LoRA's B starts at zero, so an adapter adds nothing until it trains.
    Until its matrix switches, the base weight trains in full and the adapter is frozen.
    The model stays the task model (no ``PeftModel`` wrapper), so checkpoints hold base
    weights and adapters together and resume like any full fine-tuning run.
    """
    import peft

    rename = {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in light.items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    kw = peft_kwargs(plan, rename)
    kw["use_dora"] = False
    tuner = peft.tuners.lora.LoraModel(model, peft.LoraConfig(**kw, lora_dropout=dropout), "default")
    names = [n for n, _ in model.named_parameters()]
    modules: dict[str, tuple[str, list[str]]] = {}
    for plan_name, mname in rename.items():
        base = f"{mname}.base_layer.weight"
        if base not in names:
            raise RuntimeError(f"time-aware switch: no LoRA adapter was injected into {mname}")
        adapters = [n for n in names if n.startswith(mname + ".lora_")]
        modules[plan_name + ".weight"] = (base, adapters)
    # LoraModel froze everything but the adapters: restore the full-tuning set, adapters dormant
    canon = {n: n.replace(".base_layer.", ".") for n in names}
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" not in n and canon[n] in trainable)
    return SwitchAdapters(tuner=tuner, modules=modules)


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
