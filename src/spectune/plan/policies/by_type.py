"""``by-type``: one learning-rate scale per module type, no per-matrix spectrum (a control).

A spectral rate plan mixes two things: how it treats module *types* (on MiniLM,
alpha-balance gives the 4:1 MLP matrices higher rates than the square attention
matrices, largely because of their shape) and how it orders matrices *within* a
type. This policy keeps only the first, so a comparison of the two splits a rate
plan's gain into "MLP vs attention" and "what the spectra add":

- ``scales``: explicit per-type scales, e.g. ``{attn_q: 0.8, ffn_up: 1.3}``; types
  not named get ``default`` (1);
- ``like: <rate policy>`` (with that policy's parameters, given inline or as
  ``like_params``): each type gets the parameter-weighted mean scale that policy's
  plan gives its matrices, so the plan has the same parameter-weighted mean rate
  as the plan it imitates, both overall and within every type.

Every matrix of a type gets the same scale; the like plan's trainable set and
LoRA decisions are not carried (this is a rate control).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from pydantic import Field, model_validator

from spectune.plan.policies._common import Decisions, RateConfig, sizes_of, usable, weighted_mean


class ByTypeConfig(RateConfig):
    scales: dict[str, float] = Field(default_factory=dict, description="explicit scale per module type")
    default: float = Field(1.0, gt=0, description="scale of the types `scales` does not name")
    like: str | None = Field(None, description="a rate policy whose per-type mean scales to use")
    like_params: dict[str, Any] = Field(default_factory=dict, description="parameters of the `like` policy")

    @model_validator(mode="before")
    @classmethod
    def _inline_like_params(cls, data: Any) -> Any:
        """``like: alpha-balance, map: sqrt``: keys that are not by-type's own belong to the like policy."""
        if isinstance(data, dict) and data.get("like") is not None:
            own = set(cls.model_fields)
            extra = {k: v for k, v in data.items() if k not in own}
            if extra:
                data = {k: v for k, v in data.items() if k in own}
                clash = set(extra) & set(data.get("like_params") or {})
                if clash:
                    raise ValueError(f"{', '.join(sorted(clash))}: given both inline and in like_params")
                data["like_params"] = {**(data.get("like_params") or {}), **extra}
        return data

    @model_validator(mode="after")
    def _check(self) -> ByTypeConfig:
        for t, s in self.scales.items():
            if not s > 0:
                raise ValueError(f"scales['{t}'] = {s}: scales must be > 0")
        if self.like is not None:
            if self.scales:
                raise ValueError("give either scales or like, not both")
            if self.like == "by-type":
                raise ValueError("like: by-type would imitate itself; name a spectral rate policy")
            from spectune.plan.build import policy_config

            self.like_params = policy_config(self.like, self.like_params).model_dump(mode="json")
        elif self.like_params:
            raise ValueError("like_params given without like (name the policy they belong to)")
        elif not self.scales:
            raise ValueError("by-type needs scales (per module type) or like (a rate policy to take type means from)")
        return self


def type_means(metrics: pd.DataFrame, scales: dict[str, float]) -> dict[str, float]:
    """Parameter-weighted mean scale per module type, over the matrices the scales cover."""
    rows = usable(metrics)
    sizes = sizes_of(rows)
    out = {}
    for kind, group in rows.groupby("module_type", sort=True):
        out[str(kind)] = weighted_mean({n: scales.get(n, 1.0) for n in group["name"]}, sizes)
    return out


def make(metrics: pd.DataFrame, cfg: ByTypeConfig) -> Decisions:
    rows = usable(metrics)
    kinds = sorted(set(rows["module_type"].astype(str)))
    if cfg.like is not None:
        from spectune.plan.build import decide

        _, like = decide(metrics, cfg.like, cfg.like_params)
        per_type = type_means(metrics, like.lr_scale)
        lo, hi = like.min_scale, like.max_scale
        source = f"the parameter-weighted mean scale of policy '{cfg.like}' per type"
        if like.trainable is not None or like.lora is not None:
            source += f" ('{cfg.like}' trainable set and LoRA decisions not carried)"
        notes = [f"like {cfg.like}: {n}" for n in like.notes if n.startswith("uncertainty")]
    else:
        unknown = sorted(set(cfg.scales) - set(kinds))
        if unknown:
            raise ValueError(f"scales: unknown module type(s) {', '.join(unknown)}; this model has {', '.join(kinds)}")
        per_type = {k: cfg.scales.get(k, cfg.default) for k in kinds}
        lo, hi = 1.0, 1.0
        source = "explicit scales"
        notes = []
    lo = min([lo, 1.0, *per_type.values()])
    hi = max([hi, 1.0, *per_type.values()])
    out = Decisions(min_scale=lo, max_scale=hi, notes=notes)
    if cfg.like is not None:
        out.alpha_metric, out.alphas = like.alpha_metric, like.alphas
    for name, kind in zip(rows["name"], rows["module_type"].astype(str)):
        out.lr_scale[name] = float(per_type[kind])
    out.notes.append(f"by-type ({source}): " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(per_type.items())))
    return out
