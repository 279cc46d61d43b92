"""One YAML file describes a training run; pydantic validates it and names any bad key's path."""

from __future__ import annotations

import re

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from spectune._config import ConfigError, apply_overrides, load_model  # noqa: F401  (re-exported)

from spectune.train.data import DataConfig


TrainConfigError = ConfigError  # the name spectune.train has always raised


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    name: str = Field("minilm", description="alias (minilm, smollm2-135m, gemma3-270m) or a HF model folder")
    task: Literal["auto", "classification", "causal_lm"] = "auto"
    trust_remote_code: bool = False
    max_length: int = Field(128, ge=8, description="tokens per example")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32",
        description="weights' dtype when loading: auto = the checkpoint's own (config dtype) where the hardware runs "
        "it, else float32; float16 needs CUDA (an explicit request on CPU is an error)")
    chat_template: str | None = Field(
        None, description="a Jinja chat template for data.format: chat; replaces the tokenizer's own (needed when "
        "the model ships none)")


# the losses TRL 1.x's DPOTrainer and CPOTrainer accept (checked here so a typo fails before a model is loaded)
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")

LORA_INITS = ("default", "gaussian", "pissa", "olora", "orthogonal")
DATA_INITS = ("eva", "corda", "loftq")  # PEFT has them; each needs data or a quantizer set up first


# settings only some method kinds read: under any other kind a non-default value is an error, not silently ignored
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "num_virtual_tokens": ("prompt_tuning",),
    "adalora_target_r": ("adalora",),
    "init": ("lora", "rslora", "dora", "qlora"),
    "quant_type": ("qlora",),
    "double_quant": ("qlora",),
    "compute_dtype": ("qlora",),
}


class MethodConfig(_Section):
    """How weights are trained; a plan may then narrow or re-weight it."""

    kind: Literal["full", "lora", "rslora", "dora", "qlora", "adalora", "ia3", "prompt_tuning", "bitfit", "frozen"] = "full"
    r: int = Field(8, ge=1, description="LoRA/AdaLoRA rank (init rank for AdaLoRA)")
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str | None = Field(None, description="None: every attention/MLP linear of the blocks")
    adalora_target_r: int = Field(4, ge=1)
    num_virtual_tokens: int = Field(16, ge=1)
    train_head: bool = Field(True, description="keep a new task head (classifier) trainable under PEFT methods")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="qlora: bitsandbytes 4-bit data type of the base weights")
    double_quant: bool = Field(True, description="qlora: quantize the quantization constants too (about 0.4 bit/weight saved)")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="qlora: dtype the 4-bit weights are dequantized to for each matmul")
    init: str = Field(
        "default", description="LoRA adapter initialisation, passed to PEFT's init_lora_weights: default (B = 0), "
        "gaussian, pissa, pissa_niter_<n>, olora, orthogonal; ranks still come from the plan")
    objective: Literal["sft", "dpo", "orpo", "cpo", "simpo"] = Field(
        "sft", description="what the run optimises: sft (next-token loss on the data's text or responses) or a "
        "preference objective on prompt/chosen/rejected pairs through TRL's trainers: dpo (with loss_type: sigmoid, "
        "ipo, hinge, robust, ...), orpo (odds ratio, no reference model), cpo, simpo (CPO's reference-free SimPO loss)")
    beta: float | None = Field(
        None, gt=0, description="preference strength: dpo/cpo temperature, orpo's lambda, simpo's reward scale; "
        "None = TRL's default for the objective (0.1; simpo 2.0)")
    loss_type: list[str] | str = Field(
        "sigmoid", description="dpo: one of TRL's DPO losses or a list of them (summed with loss_weights); cpo: "
        "sigmoid, hinge or ipo; orpo and simpo have their own loss and take the default")
    loss_weights: list[float] | None = Field(None, description="dpo: weight of each loss_type when several are given")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo/cpo: probability a preference label is "
                                   "flipped (robust DPO, conservative DPO)")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin over beta (gamma/beta ratio)")
    cpo_alpha: float = Field(1.0, ge=0, description="cpo: weight of the NLL term on the chosen replies")

    @field_validator("init")
    @classmethod
    def _init(cls, v: str) -> str:
        if v in LORA_INITS or re.fullmatch(r"pissa_niter_\d+", v):
            return v
        if v in DATA_INITS:
            raise ValueError(f"init {v!r} needs a pass over training data (or a quantisation config) before training, "
                             "which spectune train does not run yet; use one of " + ", ".join(LORA_INITS))
        raise ValueError(f"init {v!r} is not an initialisation PEFT knows; use one of " + ", ".join(LORA_INITS)
                         + " or pissa_niter_<n>")

    @model_validator(mode="after")
    def _kind_reads_it(self) -> "MethodConfig":
        """A kind-specific setting changed under a kind that never reads it (PEFT's own configs warn the same way)."""
        for name, kinds in KIND_FIELDS.items():
            if self.kind not in kinds and getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(f"method.{name}={getattr(self, name)!r} is read only by kind {' / '.join(kinds)}, "
                                 f"not by kind {self.kind}: drop it or change the kind")
        return self

    @model_validator(mode="after")
    def _adalora_budget(self) -> "MethodConfig":
        """AdaLoRA prunes each adapter from rank r down to adalora_target_r: a target not below r has nothing to prune."""
        if self.kind == "adalora" and self.adalora_target_r >= self.r:
            raise ValueError(f"method.adalora_target_r={self.adalora_target_r} must be below method.r={self.r} "
                             "(AdaLoRA starts every adapter at rank r and prunes the budget down to the target)")
        return self

    @model_validator(mode="after")
    def _preference(self) -> "MethodConfig":
        """A loss type TRL would only reject at the first training step is refused here, with the choices."""
        losses = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        allowed = {"dpo": DPO_LOSS_TYPES, "cpo": CPO_LOSS_TYPES}.get(self.objective, ("sigmoid",))
        bad = [x for x in losses if x not in allowed]
        if not losses or bad:
            if self.objective in ("dpo", "cpo"):
                raise ValueError(f"loss_type {bad or losses!r} is not a {self.objective} loss; use "
                                 + ", ".join(allowed))
            raise ValueError(f"loss_type {self.loss_type!r}: objective {self.objective} has its own loss; leave "
                             "loss_type unset (it applies to dpo and cpo)")
        if len(losses) > 1 and self.objective != "dpo":
            raise ValueError("a list of loss_type values (a weighted sum) is for objective dpo")
        if self.loss_weights is not None and len(self.loss_weights) != len(losses):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} values for {len(losses)} loss_type values")
        if self.objective == "dpo" and "exo_pair" in losses and self.label_smoothing == 0:
            raise ValueError("loss_type exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)")
        return self


class PlanSection(_Section):
    policy: str | None = Field(None, description="a plan policy name; None = no plan")
    params: dict[str, Any] = Field(default_factory=dict)
    file: str | None = Field(None, description="a fixed plan file instead of a policy")
    replan: Literal["never", "epoch", "steps"] = Field("epoch", description="when to re-analyze and re-plan")
    replan_every_steps: int = Field(0, ge=0)
    one_d_rule: Literal["owner", "base"] = "owner"
    alpha_estimator: Literal["hill", "farms"] = Field(
        "hill", description="the spectrum alpha is fitted on for the plan and every re-plan: hill (the matrix's own) "
        "or farms (fixed-aspect-ratio windows pooled; see docs/alpha-estimators.md)")
    switch_to_light: bool = Field(
        False,
        description="time-aware calibration (seed 001): train everything in full, then switch each of the plan's "
        "lightweight matrices to a LoRA adapter (frozen base weight) once its stable rank settles",
    )
    switch_tol: float = Field(0.01, gt=0, description="settled: relative stable-rank change below this per check")
    switch_patience: int = Field(2, ge=1, description="consecutive settled checks before a matrix switches")
    switch_every_steps: int = Field(0, ge=0, description="0: check at epoch ends")
    switch_lr_ratio: float = Field(
        10.0, gt=0,
        description="rate of a switched matrix's LoRA adapter relative to its full-tuning rate (default: the "
        "LoRA/full rate ratio of the examples, 1e-3 / 1e-4)",
    )

    @model_validator(mode="after")
    def _policy_params(self) -> "PlanSection":
        """A misspelt policy or parameter fails when the config is read, not after data and model have loaded.

        The params are only checked: they stay as written, so a stored config.yaml reads back unchanged.
        """
        if self.policy is not None:
            from spectune.plan.build import policy_config
            from spectune.plan.schema import PlanError

            try:
                policy_config(self.policy, self.params)
            except PlanError as err:
                raise ValueError(str(err)) from None
        return self


class TrainSection(_Section):
    epochs: float = Field(3, gt=0)
    max_steps: int = Field(-1, description="overrides epochs when > 0")
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    seed: int = 0
    max_grad_norm: float = 1.0
    bf16: bool = False
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="how processes under a launcher (torchrun, accelerate launch) share the model: ddp = a "
        "whole copy each; fsdp = FSDP2, parameters, gradients and optimizer state sharded (needs GPUs; "
        "docs/training.md, FSDP)")
    fsdp_config: dict[str, Any] = Field(
        default_factory=dict, description="fsdp: FSDP2 options passed to the Trainer (transformer_layer_cls_to_wrap, "
        "reshard_after_forward, cpu_offload)")

    @field_validator("fsdp_config")
    @classmethod
    def _fsdp_config(cls, v: dict[str, Any], info: Any) -> dict[str, Any]:
        from spectune.train.distributed import check_fsdp_options

        return check_fsdp_options(v, info.data.get("distributed", "ddp"))


class EvalSection(_Section):
    every: Literal["epoch", "steps", "no"] = "epoch"
    every_steps: int = Field(0, ge=0)
    batch_size: int = Field(64, ge=1)
    final_splits: list[Literal["train", "validation", "test"]] = Field(
        default_factory=lambda: ["train", "validation", "test"],
        description="splits evaluated after training; a hyper-parameter search leaves out test",
    )
    chunk_mb: int = Field(
        64, ge=1,
        description="causal LM: MiB of float32 logits one cross-entropy chunk may hold (evaluation memory "
        "no longer grows with batch x vocabulary)",
    )
    fused_cross_entropy: Literal["auto", "torch", "liger"] = Field(
        "auto",
        description="causal LM evaluation's cross-entropy: liger (Liger Kernel's fused linear cross-entropy, "
        "CUDA only), torch (chunked head), auto (liger when on CUDA with liger-kernel installed, else torch)",
    )


class OutputSection(_Section):
    dir: str = "runs/run"
    save_every: Literal["epoch", "steps", "no"] = "epoch"
    save_every_steps: int = Field(0, ge=0)
    save_total_limit: int = Field(2, ge=1)
    save_final: bool = True


class LoggingSection(_Section):
    every_steps: int = Field(10, ge=1)
    tensorboard: bool = True
    progress: bool = True
    track_spectra_every_steps: int = Field(0, ge=0, description="0: only at epoch ends")
    track_metrics: list[str] = Field(
        default_factory=lambda: ["stable_rank", "top_eig_ratio", "alpha_hill", "spectral_norm"],
        description="analysis columns tracked per matrix; [] switches spectral tracking off",
    )


class TrainConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    plan: PlanSection = Field(default_factory=PlanSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output: OutputSection = Field(default_factory=OutputSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    @model_validator(mode="after")
    def _parts_fit(self) -> "TrainConfig":
        """Refuse what cannot run: a switch without a full-tuning run and a plan, a plan under prompt tuning, and
        settings a preference objective cannot take."""
        if self.plan.switch_to_light and (self.method.kind != "full" or not (self.plan.policy or self.plan.file)):
            raise ValueError("plan.switch_to_light needs method.kind=full and a plan with lightweight matrices "
                             "(policy stable-rank with low: lora)")
        if self.method.kind == "prompt_tuning" and (self.plan.policy or self.plan.file):
            raise ValueError("method.kind=prompt_tuning trains virtual token embeddings and no weight matrix, so a "
                             "plan's per-matrix rates, ranks or trainable set have nothing to apply to; drop plan "
                             "or use a LoRA kind")
        objective = self.method.objective
        if objective == "sft":
            return self
        if "classification" in (self.model.task, self.data.task):
            raise ValueError(f"method.objective={objective} trains a causal language model on prompt/chosen/rejected "
                             "pairs; model.task / data.task classification cannot use it (use objective sft)")
        if self.plan.switch_to_light:
            raise ValueError(f"plan.switch_to_light is not supported with method.objective={objective}: the reference "
                             "model of a preference run is fixed when the trainer is built, before any switch")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> TrainConfig:
    """Read, override (``key.path=value``) and validate a training configuration."""
    return load_model(TrainConfig, source, overrides, what="training config")


# keys older spectune versions wrote into config.yaml that no run ever read: dropped when a stored config is read back
RETIRED_KEYS = ("data.block_size",)


def stored_config_yaml(text: str) -> str:
    """A config.yaml written by an earlier spectune, read back through today's schema.

    Keys added since then take their defaults, so a run is compared with a new
    config on what it was given, not on fields it never knew. A stored config that
    today's schema rejects (a removed key) is returned as it is, and then differs.
    """
    try:
        data = yaml.safe_load(text)
        for path in RETIRED_KEYS:
            section, key = path.split(".")
            (data.get(section) or {}).pop(key, None)
        return load_config(data).to_yaml()
    except Exception:  # noqa: BLE001 - unreadable under today's schema: compare the text as it is
        return text
