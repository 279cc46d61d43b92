"""One YAML file describes a training run; pydantic validates it and names any bad key's path."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from spectune._config import ConfigError, apply_overrides, load_model, to_yaml  # noqa: F401  (re-exported)

from spectune.train.data import DataConfig
from spectune.train.methods import MethodConfig, kind_problem, merge_problem, plan_problem
from spectune.train.methods.full import FullConfig


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
    merge: bool = Field(False, description="also write merged/: the adapters merged into the base, a standard "
                        "Hugging Face folder with the tokenizer (QLoRA: into the dequantized base)")


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
    method: MethodConfig = Field(default_factory=FullConfig)
    plan: PlanSection = Field(default_factory=PlanSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output: OutputSection = Field(default_factory=OutputSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    @field_validator("method", mode="before")
    @classmethod
    def _method_kind(cls, method: Any) -> Any:
        """``method`` without a kind is full fine-tuning (as it always was); a key of another kind is named in one line."""
        if isinstance(method, dict):
            method = {"kind": "full", **method}
            problem = kind_problem(method)
            if problem:
                raise ValueError(problem)
        return method

    @model_validator(mode="after")
    def _parts_fit(self) -> "TrainConfig":
        """Refuse what cannot run: a plan a kind cannot follow, a switch without a full-tuning run and a plan, and
        settings a preference objective cannot take."""
        problem = plan_problem(self.method.kind, self.plan.policy, self.plan.params, bool(self.plan.file))
        if problem:
            raise ValueError(problem)
        if self.output.merge:
            if not self.output.save_final:
                raise ValueError("output.merge merges the saved final/ adapters: it needs output.save_final: true")
            problem = merge_problem(self.method, "output.merge")
            if problem:
                raise ValueError(problem)
        if self.plan.switch_to_light and (self.method.kind != "full" or not (self.plan.policy or self.plan.file)):
            raise ValueError("plan.switch_to_light needs method.kind=full and a plan with lightweight matrices "
                             "(policy stable-rank with low: lora)")
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
        return to_yaml(self)


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> TrainConfig:
    """Read, override (``key.path=value``) and validate a training configuration."""
    return load_model(TrainConfig, source, overrides, what="training config")


# keys older spectune versions wrote into config.yaml that no run ever read: dropped when a stored config is read back
RETIRED_KEYS = ("data.block_size",)


def flat_method(method: dict[str, Any]) -> dict[str, Any]:
    """A ``method`` section written before the registry (one flat config for every kind) as its kind's own.

    The flat config wrote every field under every kind, and a kind never read the
    others' (a changed one was refused, or ignored), so dropping them keeps the run.
    """
    from spectune.train.methods import METHODS

    kind = method.get("kind", "full")
    if kind not in METHODS:
        return method
    own = METHODS[kind].config.model_fields
    return {k: v for k, v in method.items() if k in own}


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
        data["method"] = flat_method(data.get("method") or {})
        return load_config(data).to_yaml()
    except Exception:  # noqa: BLE001 - unreadable under today's schema: compare the text as it is
        return text
