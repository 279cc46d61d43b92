"""The comparison's closing table as printed: one row per task and method, cut to the terminal's width."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from spectune.compare.pareto import fmt_mb

def _count(n: float) -> str:
    if not math.isfinite(n):
        return "-"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else f"{n:.0f}"



def _trainable(r: pd.Series) -> str:
    """What a method trains: "35.4M of 134.5M" where it trains a subset at a time (LISA), else the count."""
    total, active = r["trainable_parameters"], r.get("trainable_parameters_active", math.nan)
    if math.isfinite(active) and math.isfinite(total) and active < total:
        return f"{_count(active)} of {_count(total)}"
    return _count(total)



# the printed table's columns, most wanted first: a narrow terminal loses them from the end of this list; the task
# and the mean (the number a reader came for) are never cut, the method is never dropped (it wraps when it must);
# the report and summary.csv keep every column
CONSOLE_PRIORITY = ["task", "mean", "method", "95% CI", "difference [95% CI]", "verdict", "peak mem", "front", "vs", "n",
                    "s/step", "p", "w/t/l", "trainable", "time_s", "optim state", "lr scale"]

NEVER_CUT = ("task", "mean")

NEVER_DROPPED = NEVER_CUT + ("method",)



def fit_columns(rows: pd.DataFrame, width: int, padding: int = 3) -> list[str]:
    """The columns of ``rows`` that fit in ``width`` characters, in the table's order, dropping the least wanted first.

    A column needs its longest cell (or header) plus ``padding`` (rich's table: a space either
    side and a rule); ``task``, ``mean`` and ``method`` are kept whatever the width.
    """
    need = {c: max([len(str(c))] + [len(str(v)) for v in rows[c]]) + padding for c in rows}
    keep = [c for c in CONSOLE_PRIORITY if c in need] + [c for c in need if c not in CONSOLE_PRIORITY]
    while sum(need[c] for c in keep) + 1 > width and any(c not in NEVER_DROPPED for c in keep):
        keep.remove(next(c for c in reversed(keep) if c not in NEVER_DROPPED))
    return [c for c in rows if c in keep]



def console_rows(summary: pd.DataFrame, pairs: pd.DataFrame, front: pd.DataFrame | None = None) -> list[dict[str, Any]]:
    """The printed results table: a row per task and method with its interval, its paired verdict and its costs
    (peak memory: the CUDA peak where recorded, else resident; ``front``: on the quality-memory front)."""
    rows = []
    on_front = {(r["task"], r["method"]): bool(r["on_memory_front"]) for _, r in front.iterrows()} \
        if front is not None and not front.empty else {}
    for _, r in summary.iterrows():
        p = pairs[(pairs["task"] == r["task"]) & (pairs["method"] == r["method"])] if not pairs.empty else pairs
        gpu = r.get("peak_gpu_memory_mb", math.nan)
        rows.append({
            "task": r["task"], "method": r["method"], "n": r["n"], "mean": f"{r['mean']:.3f}",
            "95% CI": f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if math.isfinite(r["ci_low"]) else "-",
            "vs": p["baseline"].iloc[0] if len(p) else "(baseline)",
            "difference [95% CI]": (f"{p['diff'].iloc[0]:+.3f} [{p['ci_low'].iloc[0]:+.3f}, {p['ci_high'].iloc[0]:+.3f}]"
                                    if len(p) and math.isfinite(p["ci_low"].iloc[0]) else "-"),
            "p": f"{p['p_ttest'].iloc[0]:.2g}" if len(p) and math.isfinite(p["p_ttest"].iloc[0]) else "-",
            "w/t/l": f"{p['wins'].iloc[0]}/{p['ties'].iloc[0]}/{p['losses'].iloc[0]}" if len(p) else "",
            "verdict": p["verdict"].iloc[0] if len(p) else "",
            "lr scale": f"{r.get('mean_lr_scale', math.nan):.2f}", "trainable": _trainable(r),
            "optim state": _count(r.get("optimizer_state_parameters", math.nan)),
            "peak mem": fmt_mb(gpu if math.isfinite(gpu) else r.get("peak_memory_mb", math.nan)),
            "s/step": f"{r['seconds_per_step']:.3g}" if math.isfinite(r.get("seconds_per_step", math.nan)) else "-",
            "time_s": f"{r['wall_time_s']:.0f}",
            "front": {True: "yes", False: "no"}.get(on_front.get((r["task"], r["method"])), ""),  # type: ignore[call-overload]
        })
    return rows
