"""The plan file: a typed, versioned record of per-layer fine-tuning decisions.

A plan is meant to be read, diffed and committed, so it is YAML with a fixed
key order and one decision per line, validated on load: a hand edit that makes a
rank negative or a scale leave its policy's bounds is an error naming the key.

Format versions: 1 (rates, ranks, trainable set); 2 adds ``alpha_estimator`` (which
alpha the analysis behind the plan fitted) and per-matrix weight-decay multipliers
``wd_scale`` with their bounds. A version-1 file loads as a version-2 plan whose new
keys take the meaning version 1 had (hill alphas, every decay multiplier 1); a file
of a newer version than this spectune reads is refused, naming ``format_version``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spectune import _io
from spectune._config import to_yaml

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
ALPHA_ESTIMATORS = ("hill", "farms")


class PlanError(ValueError):
    """A plan file that cannot be used; the message names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraDecision(_Strict):
    """LoRA adapters: which modules, which rank and alpha each, which variant."""

    target_modules: list[str] = Field(description="module names (parameter name without '.weight')")
    r: int = Field(8, ge=1, description="default rank (modules without a pattern entry)")
    lora_alpha: float = Field(16, gt=0)
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    use_qlora: bool = False

    @field_validator("rank_pattern")
    @classmethod
    def _ranks_positive(cls, v: dict[str, int]) -> dict[str, int]:
        for k, r in v.items():
            if r < 1:
                raise ValueError(f"rank of '{k}' is {r}; ranks must be >= 1")
        return v

    @field_validator("alpha_pattern")
    @classmethod
    def _alphas_positive(cls, v: dict[str, float]) -> dict[str, float]:
        for k, a in v.items():
            if not a > 0:
                raise ValueError(f"alpha of '{k}' is {a}; alphas must be > 0")
        return v


class Plan(_Strict):
    """Decisions for one fine-tuning run, with everything needed to know where they came from."""

    format_version: int = FORMAT_VERSION
    spectune_version: str
    model: str = Field(description="the analyzed model's identity (path or alias)")
    analysis_digest: str = Field(description="digest of the metrics table the plan was computed from")
    alpha_estimator: str = Field("hill", description="alpha estimator of that analysis: hill or farms")
    policy: str
    params: dict[str, Any] = Field(default_factory=dict, description="every parameter the policy used")
    min_scale: float = Field(0.0, ge=0)
    max_scale: float = Field(1.0, gt=0)
    wd_min_scale: float = Field(1.0, ge=0, description="lower bound of the weight-decay multipliers")
    wd_max_scale: float = Field(1.0, ge=0, description="upper bound of the weight-decay multipliers")
    lr_scale: dict[str, float] = Field(default_factory=dict, description="learning-rate multiplier per matrix")
    wd_scale: dict[str, float] = Field(
        default_factory=dict, description="weight-decay multiplier per matrix (absent: 1); 1-D parameters get no decay"
    )
    one_d_rule: str = Field("owner", description="rate of 1-D parameters: owner (their matrix's) or base")
    trainable: list[str] | None = Field(None, description="matrices trained in full; None = all")
    lora: LoraDecision | None = None
    notes: list[str] = Field(default_factory=list)
    excluded: list[str] = Field(default_factory=list, description="matrices left at the base rate (NaN metric)")

    @field_validator("format_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v > FORMAT_VERSION:
            from spectune import __version__

            raise ValueError(
                f"plan format version {v} is newer than this spectune ({__version__}) reads "
                f"(versions {READABLE_VERSIONS[0]}-{FORMAT_VERSION}); upgrade spectune to use this plan"
            )
        if v not in READABLE_VERSIONS:
            raise ValueError(f"plan format version {v} is not supported (this spectune reads versions "
                             f"{READABLE_VERSIONS[0]}-{FORMAT_VERSION})")
        # an older file is read with its version's meaning (the defaults above) and is from here on
        # a plan of the current version: saving it writes every current key
        return FORMAT_VERSION

    @field_validator("alpha_estimator")
    @classmethod
    def _estimator(cls, v: str) -> str:
        if v not in ALPHA_ESTIMATORS:
            raise ValueError(f"alpha_estimator must be one of {', '.join(ALPHA_ESTIMATORS)}, not '{v}'")
        return v

    @field_validator("one_d_rule")
    @classmethod
    def _rule(cls, v: str) -> str:
        if v not in ("owner", "base"):
            raise ValueError(f"one_d_rule must be 'owner' or 'base', not '{v}'")
        return v

    @model_validator(mode="after")
    def _bounds(self) -> Plan:
        for name, s in self.lr_scale.items():
            if not math.isfinite(s) or s < self.min_scale - 1e-12 or s > self.max_scale + 1e-12:
                raise ValueError(
                    f"lr_scale['{name}'] = {s} is outside the policy's bounds [{self.min_scale}, {self.max_scale}]"
                )
        if self.wd_min_scale > self.wd_max_scale:
            raise ValueError(f"wd_min_scale {self.wd_min_scale} exceeds wd_max_scale {self.wd_max_scale}")
        for name, s in self.wd_scale.items():
            if not math.isfinite(s) or s < self.wd_min_scale - 1e-12 or s > self.wd_max_scale + 1e-12:
                raise ValueError(
                    f"wd_scale['{name}'] = {s} is outside the policy's bounds [{self.wd_min_scale}, {self.wd_max_scale}]"
                )
        return self

    def decay_scale(self, name: str) -> float:
        """Weight-decay multiplier of a matrix (1 where the plan sets none)."""
        return self.wd_scale.get(name, 1.0)

    # -- files ---------------------------------------------------------------------------

    def to_yaml(self) -> str:
        return to_yaml(self, width=120)

    def save(self, path: str | Path) -> Path:
        return _io.write_text(path, self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        if not p.exists():
            raise PlanError(f"plan file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise PlanError(f"plan file {p} is not valid YAML: {err}") from err
        return cls.from_dict(data, where=str(p))

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> Plan:
        if not isinstance(data, dict):
            raise PlanError(f"{where}: a plan is a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            lines = [f"{'.'.join(map(str, e['loc'])) or '(plan)'}: {e['msg']}" for e in err.errors()]
            raise PlanError(f"{where} is not a valid plan:\n  " + "\n  ".join(lines)) from None
