"""From an analysis and a policy to a Plan."""

from __future__ import annotations

from typing import Any

import pandas as pd
from pydantic import ValidationError

from spectune.analyze.result import AnalysisResult
from spectune.plan.policies import POLICIES, PolicyConfig
from spectune.plan.policies._common import Decisions, RateConfig, normalize_mean
from spectune.plan.schema import Plan, PlanError


def policy_config(policy: str, params: dict[str, Any] | PolicyConfig | None = None) -> PolicyConfig:
    """Validated config of a named policy; unknown policies and keys are errors that say what exists."""
    if policy not in POLICIES:
        raise PlanError(f"unknown policy '{policy}'; choose one of: {', '.join(POLICIES)}")
    cls, _ = POLICIES[policy]
    if isinstance(params, cls):
        return params
    try:
        return cls.model_validate(params or {})
    except ValidationError as err:
        lines = [f"{'.'.join(map(str, e['loc'])) or policy}: {e['msg']}" for e in err.errors()]
        fields = ", ".join(cls.model_fields)
        raise PlanError(f"invalid parameters for policy '{policy}':\n  " + "\n  ".join(lines) + f"\n  (known: {fields})") from None


def decide(metrics: pd.DataFrame, policy: str, params: dict[str, Any] | PolicyConfig | None = None
           ) -> tuple[PolicyConfig, Decisions]:
    """One policy's validated config and decisions on a metrics table, ``normalize: mean`` applied.

    What ``plan`` builds a Plan from, and what a policy that composes another one
    (``by-type`` with ``like``, ``alpha-decay`` with ``rates``) calls, so the composed
    policy's rates are exactly the ones its own plan would hold.
    """
    cfg = policy_config(policy, params)
    _, make = POLICIES[policy]
    d = make(metrics, cfg)
    if isinstance(cfg, RateConfig) and cfg.normalize == "mean":
        _normalize(d, metrics, cfg.max_scale)
    return cfg, d


def plan(analysis: AnalysisResult, policy: str = "uniform", params: dict[str, Any] | PolicyConfig | None = None,
         one_d_rule: str = "owner") -> Plan:
    """Decisions of ``policy`` for the analyzed model; pure: same analysis and params, same plan."""
    from spectune import __version__

    metrics: pd.DataFrame = analysis.metrics
    cfg = policy_config(policy, params)
    try:
        estimator = analysis.alpha_estimator
        _, d = decide(metrics, policy, cfg)
    except PlanError:
        raise
    except ValueError as err:
        raise PlanError(f"policy '{policy}': {err}") from err
    lr = {k: round(float(v), 6) for k, v in sorted(d.lr_scale.items())}
    wd = {k: round(float(v), 6) for k, v in sorted(d.wd_scale.items())}
    return Plan(
        spectune_version=__version__,
        model=analysis.source,
        analysis_digest=analysis.digest(),
        alpha_estimator=estimator,
        policy=policy,
        params=cfg.model_dump(mode="json"),
        # a bound like 10 ** 0.5 can sit a rounding step inside the stored (6-digit) scale it bounds
        min_scale=min([d.min_scale, *lr.values()]),
        max_scale=max([d.max_scale, *lr.values()]),
        wd_min_scale=min([d.wd_min_scale, *wd.values()]),
        wd_max_scale=max([d.wd_max_scale, *wd.values()]),
        lr_scale=lr,
        wd_scale=wd,
        one_d_rule=one_d_rule,
        trainable=d.trainable,
        lora=d.lora,
        notes=d.notes,
        excluded=sorted(set(d.excluded)),
    )


def _normalize(d: Decisions, metrics: pd.DataFrame, cap: float) -> None:
    """``normalize: mean``: the plan's parameter-weighted mean scale becomes 1 (see normalize_mean)."""
    sizes = dict(zip(metrics["name"], pd.to_numeric(metrics["numel"], errors="coerce").fillna(0)))
    before = sum(sizes.get(n, 0) * v for n, v in d.lr_scale.items()) / max(sum(sizes.get(n, 0) for n in d.lr_scale), 1)
    d.lr_scale = {k: round(v, 6) for k, v in normalize_mean(d.lr_scale, sizes, cap).items()}  # as the plan stores them
    d.min_scale = min(d.min_scale, min(d.lr_scale.values()))
    d.max_scale = max(d.max_scale, cap)
    d.notes.append(f"normalize: mean: scales multiplied so their parameter-weighted mean is 1 (was {before:.3f}), cap {cap:g}")


def plan_table(p: Plan, analysis: AnalysisResult | None = None) -> pd.DataFrame:
    """One row per matrix: its decisions (and, given the analysis, the metrics behind them)."""
    names = sorted(set(p.lr_scale) | set(p.trainable or []))
    lora = p.lora
    rank = {}
    if lora is not None:
        rank = {t: lora.rank_pattern.get(t, lora.r) for t in lora.target_modules}
    rows = []
    for n in names:
        mod = n.removesuffix(".weight")
        rows.append(
            {
                "name": n,
                "lr_scale": p.lr_scale.get(n, 1.0),
                "wd_scale": p.decay_scale(n),
                "trainable": (p.trainable is None) or (n in p.trainable),
                "lora_rank": rank.get(mod),
                "excluded": n in p.excluded,
            }
        )
    df = pd.DataFrame(rows)
    if analysis is not None and not df.empty:
        keep = ["name", "module_type", "layer_index", "svd_metric", "ce_metric", "cs_metric", "alpha_hill", "num_spikes", "snr", "stable_rank"]
        keep = [c for c in keep if c in analysis.metrics]
        df = df.merge(analysis.metrics[keep], on="name", how="left")
    return df
