"""What an alpha-driven policy does with an alpha it cannot trust: ``uncertainty: ignore | shrink | exclude``.

Every alpha column of an analysis carries a standard error ``<metric>_se`` and flags
``<metric>_flags`` (docs/metrics.md, "Uncertainty of alpha"). Before a policy maps
alphas to rates, decays or ranks:

- ``ignore`` (default): the alphas as fitted.
- ``exclude``: matrices whose fit carries a flag (of ``uncertainty_flags``) get the base
  setting, as a matrix without the metric does.
- ``shrink``: within each module type, an empirical-Bayes (random-effects) estimate. With
  a_i the alphas and s_i their standard errors over the type's unflagged matrices,
  w_i = 1 / s_i^2, mu_w = sum w a / sum w, Q = sum w (a - mu_w)^2 and
  tau^2 = max(0, (Q - (k - 1)) / (sum w - sum w^2 / sum w)) (DerSimonian & Laird 1986, the
  spread between matrices beyond their own noise); mu = sum a / (s^2 + tau^2) / sum 1 / (s^2 + tau^2);
  each alpha becomes mu + tau^2 / (tau^2 + s_i^2) (a_i - mu), pulled toward the type mean
  by its own variance against the spread (the normal-normal posterior mean, Efron & Morris
  1975; Morris 1983). tau^2 = 0 gives every matrix of the type the type mean. A flagged fit
  carries no per-matrix information and takes the type mean; with fewer than two unflagged
  fits in a type no spread can be estimated and all its matrices take its plain mean. A
  type with a single matrix has no mean to shrink toward: it falls back to ``exclude``,
  with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

MODES = ("ignore", "shrink", "exclude")
FLAGS = ("degenerate", "outlier_dominated", "not_power_law")
Mode = Literal["ignore", "shrink", "exclude"]


def mode_field() -> Mode:
    """The ``uncertainty`` field every alpha-driven policy config declares."""
    return Field(  # type: ignore[return-value]
        "ignore",
        description="what to do with uncertain alphas: ignore (as fitted), shrink (toward the module type's mean "
        "by their standard error, empirical Bayes) or exclude (flagged fits get the base setting)",
    )


def flags_field() -> list[str]:
    """The ``uncertainty_flags`` field: which flags make a fit untrusted under shrink and exclude."""
    return Field(  # type: ignore[return-value]
        default_factory=lambda: list(FLAGS),
        description="flags that make an alpha untrusted under shrink/exclude (degenerate, outlier_dominated, "
        "not_power_law)",
    )


def check_flags(flags: list[str]) -> list[str]:
    unknown = sorted(set(flags) - set(FLAGS))
    if unknown:
        raise ValueError(f"uncertainty_flags: unknown flag(s) {', '.join(unknown)}; known: {', '.join(FLAGS)}")
    return flags


@dataclass
class Adjusted:
    """Alphas after the uncertainty rule: the values a policy maps, the matrices it leaves at base, notes."""

    values: pd.Series
    excluded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tau2: dict[str, float] = field(default_factory=dict)  # shrink: between-matrix variance per module type


def flagged(metrics: pd.DataFrame, metric: str, names: pd.Index, flags: list[str]) -> pd.Series:
    """True where the fit of ``metric`` carries one of ``flags`` (False when nothing is recorded)."""
    col = f"{metric}_flags"
    table = metrics.set_index("name")
    if col not in table:
        return pd.Series(False, index=names)
    text = table.loc[names, col].fillna("").astype(str)
    return text.map(lambda t: any(f in t.split(",") for f in flags)).astype(bool)


def standard_errors(metrics: pd.DataFrame, metric: str, names: pd.Index) -> pd.Series:
    col = f"{metric}_se"
    table = metrics.set_index("name")
    if col not in table:
        raise ValueError(f"uncertainty: the analysis has no {col} column (it predates alpha intervals); "
                         "analyze the model again to use shrink or exclude")
    return pd.to_numeric(table.loc[names, col], errors="coerce").astype(float)


def random_effects(a: np.ndarray, se: np.ndarray) -> tuple[float, float]:
    """(mu, tau^2): DerSimonian-Laird between-matrix variance and the random-effects mean."""
    w = 1.0 / se**2
    mu_w = float(np.sum(w * a) / np.sum(w))
    q = float(np.sum(w * (a - mu_w) ** 2))
    denom = float(np.sum(w) - np.sum(w**2) / np.sum(w))
    tau2 = max(0.0, (q - (len(a) - 1)) / denom) if denom > 0 else 0.0
    w_star = 1.0 / (se**2 + tau2)
    return float(np.sum(w_star * a) / np.sum(w_star)), tau2


def adjust(metrics: pd.DataFrame, values: pd.Series, metric: str, mode: str, flags: list[str] | None = None) -> Adjusted:
    """``values`` (alphas of ``metric``, indexed by matrix name) under the uncertainty rule ``mode``."""
    if mode == "ignore" or values.empty:
        return Adjusted(values)
    flags = list(FLAGS) if flags is None else flags
    bad = flagged(metrics, metric, values.index, flags)
    se = standard_errors(metrics, metric, values.index)
    untrusted = bad | ~np.isfinite(se) | ~(se > 0)
    if mode == "exclude":
        excluded = list(values.index[untrusted])
        out = Adjusted(values[~untrusted], excluded=excluded)
        out.notes.append(f"uncertainty exclude: {len(excluded)} of {len(values)} matrices with a flagged {metric} fit "
                         f"({', '.join(flags)}) keep the base setting")
        return out
    if mode != "shrink":
        raise ValueError(f"uncertainty: unknown rule '{mode}'; choose one of {', '.join(MODES)}")
    return _shrink(metrics, values, metric, untrusted, se)


def _shrink(metrics: pd.DataFrame, values: pd.Series, metric: str, untrusted: pd.Series, se: pd.Series) -> Adjusted:
    kinds = metrics.set_index("name").loc[values.index, "module_type"].astype(str)
    out = Adjusted(values.astype(float).copy())
    thin: list[str] = []
    for kind in sorted(set(kinds)):
        members = list(kinds.index[kinds == kind])
        if len(members) == 1:
            warnings.warn(f"uncertainty: shrink: module type '{kind}' has a single matrix ({members[0]}): no type mean "
                          "to shrink toward; exclude used for it", stacklevel=4)
            out.notes.append(f"uncertainty shrink: module type '{kind}' has a single matrix: exclude used for it")
            if untrusted[members[0]]:
                out.excluded.append(members[0])
                out.values = out.values.drop(members[0])
            continue
        trusted = [n for n in members if not untrusted[n]]
        if len(trusted) >= 2:
            mu, tau2 = random_effects(values[trusted].to_numpy(float), se[trusted].to_numpy(float))
        else:  # no spread can be estimated from fewer than two trusted fits: the type's plain mean for all
            mu, tau2 = float(values[members].mean()), 0.0
            thin.append(kind)
        out.tau2[kind] = tau2
        for n in members:
            out.values[n] = mu if untrusted[n] else mu + tau2 / (tau2 + se[n] ** 2) * (values[n] - mu)
    kept = out.values.index
    moved = int((~np.isclose(out.values.to_numpy(), values[kept].to_numpy(), rtol=0, atol=1e-9)).sum())
    out.notes.append(
        f"uncertainty shrink: {moved} of {len(values)} matrices' {metric} moved toward their module type's mean "
        f"({int(untrusted[kept].sum())} flagged fits took it); between-matrix variance tau^2 per type: "
        + ", ".join(f"{k} {v:.3g}" for k, v in out.tau2.items())
        + (f"; fewer than two trusted fits in {', '.join(thin)}: their matrices took the plain type mean" if thin else ""))
    return out
