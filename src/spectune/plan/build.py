"""From an analysis and a policy to a Plan."""

from __future__ import annotations

import warnings
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
    rule = getattr(cfg, "uncertainty", "ignore")
    if rule != "ignore":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the comparison run repeats the policy's own warnings
            _, base = decide(metrics, policy, cfg.model_copy(update={"uncertainty": "ignore"}))
        moved = changed(d, base)
        d.notes.append(f"uncertainty {rule}: {len(moved)} matrices' decisions differ from uncertainty: ignore"
                       + (f" ({', '.join(moved[:3])}{', ...' if len(moved) > 3 else ''})" if moved else ""))
    return cfg, d


def changed(a: Decisions, b: Decisions, tol: float = 1e-9) -> list[str]:
    """Matrices whose rate, decay, trainability or LoRA rank differ between two decisions."""
    names = set(a.lr_scale) | set(b.lr_scale) | set(a.wd_scale) | set(b.wd_scale)
    out = {n for n in names if abs(a.lr_scale.get(n, 1.0) - b.lr_scale.get(n, 1.0)) > tol
           or abs(a.wd_scale.get(n, 1.0) - b.wd_scale.get(n, 1.0)) > tol}
    if (a.trainable is None) != (b.trainable is None) or set(a.trainable or []) != set(b.trainable or []):
        out |= set(a.trainable or []) ^ set(b.trainable or [])
    ranks = [{t: (d.lora.rank_pattern.get(t, d.lora.r) if t in d.lora.target_modules else 0) for t in d.lora.target_modules}
             if d.lora is not None else {} for d in (a, b)]
    out |= {f"{t}.weight" for t in set(ranks[0]) | set(ranks[1]) if ranks[0].get(t, 0) != ranks[1].get(t, 0)}
    return sorted(out)


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
        df = _with_alphas(df, p, analysis)
    return df


def _with_alphas(df: pd.DataFrame, p: Plan, analysis: AnalysisResult) -> pd.DataFrame:
    """The alpha an alpha-driven plan read for each matrix: as fitted, its 95% interval and flags, and as used.

    ``alpha_used`` is the value after the plan's uncertainty rule (shrunk toward the type
    mean, or absent where excluded); the policy is re-run on the analysis to get it, so it
    is exactly what the plan was computed from.
    """
    if p.policy not in POLICIES:
        return df
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _, d = decide(analysis.metrics, p.policy, p.params)
        except (ValueError, PlanError):
            return df
    if d.alpha_metric is None:
        return df
    col = d.alpha_metric
    extra = [c for c in (col, f"{col}_lo", f"{col}_hi", f"{col}_flags") if c in analysis.metrics and c not in df]
    df = df.merge(analysis.metrics[["name", *extra]], on="name", how="left") if extra else df
    df["alpha_used"] = df["name"].map(d.alphas).astype(float)
    df.attrs["alpha_metric"] = col
    return df
