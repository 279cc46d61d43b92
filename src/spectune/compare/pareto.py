"""Quality against cost: which methods no other beats at lower cost, and which one to run within a budget.

An engineer choosing a fine-tuning recipe asks "within my memory, what should I run?",
not "which method scores highest". Per task, a method is **on the front** when no other
method that needs lower or equal cost is *significantly* better on the task's test
metric: the other's paired difference over matched seeds (same seed = same training
rows) has a 95% interval wholly on the good side of 0. A method better only within
noise does not dominate, so a cheap method that ties an expensive one stays on the
front beside it. Costs within ``COST_TOLERANCE`` (5%) of each other count as equal:
two full fine-tunings differ by a few MB of allocator noise, and neither is "cheaper".

The recommendation within a budget is the least-cost method that no method within the
budget beats significantly: the one to run unless a better one is worth more memory.
No multiple-comparison correction is applied to these pairwise intervals (the
paired table's Benjamini-Hochberg column is the corrected view against the baseline).

Memory is the CUDA peak where every cell recorded one, else the peak resident memory;
time is each cell's wall time (loading, any spectral analysis, training, evaluation).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pandas as pd

from spectune.compare.stats import _ok, higher_is_better, per_task, t_interval

COST_TOLERANCE = 0.05
TIME_COLUMN = "wall_time_s"
_UNITS = {"": 1.0, "b": 2**-20, "k": 2**-10, "m": 1.0, "g": 2**10, "t": 2**20}


def parse_budget(text: str) -> float:
    """A memory budget in MiB: ``4GB``, ``4 GiB``, ``512MB``, ``1.5g``; a bare number is MB. GB means GiB here."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if m is None or (m.group(2) == "" and m.group(3) not in (None, "b")) or float(m.group(1)) <= 0:
        raise ValueError(f"--budget {text!r}: write a positive size such as 4GB or 512MB")
    unit = m.group(2) or ("b" if m.group(3) == "b" else "")
    return float(m.group(1)) * _UNITS[unit]


def memory_column(df: pd.DataFrame) -> str:
    """``peak_gpu_memory_mb`` where every finished cell recorded a CUDA peak, else ``peak_memory_mb`` (resident)."""
    ok = _ok(df)
    if "peak_gpu_memory_mb" in ok and len(ok) and pd.to_numeric(ok["peak_gpu_memory_mb"], errors="coerce").notna().all():
        return "peak_gpu_memory_mb"
    return "peak_memory_mb"


def fmt_mb(mb: float) -> str:
    if not math.isfinite(mb):
        return "-"
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def _beaten_by(wide: pd.DataFrame, method: str, up: bool) -> list[str]:
    """The methods whose paired 95% interval against ``method`` lies wholly on the good side of 0."""
    out = []
    for other in wide.columns:
        if other == method:
            continue
        pair = wide[[method, other]].dropna()
        _, lo, hi = t_interval((pair[other] - pair[method]).to_numpy(dtype=float))
        if math.isfinite(lo) and (lo > 0 if up else hi < 0):
            out.append(str(other))
    return out


def _interval(values: pd.Series) -> tuple[float, float, float]:
    return t_interval(pd.to_numeric(values, errors="coerce").to_numpy(dtype=float))


def front_table(df: pd.DataFrame, metric: str = "auto", tolerance: float = COST_TOLERANCE) -> pd.DataFrame:
    """Per task and method: quality and cost (mean and 95% interval over seeds), who beats it, and the fronts.

    ``beaten_by``: methods significantly better at any cost; ``memory_dominated_by`` and
    ``time_dominated_by``: those of them at lower or equal (within ``tolerance``) memory or time.
    A method with no cost recorded (cells from before it was measured) is on no front.
    """
    mem_col = memory_column(df)
    rows = []
    for task, col, part, wide in per_task(df, metric):
        up = higher_is_better(col)
        for method, g in part.groupby("method", sort=False):
            mean, lo, hi = _interval(g[col])
            mem, mem_lo, mem_hi = _interval(g[mem_col]) if mem_col in g else (math.nan,) * 3
            sec, sec_lo, sec_hi = _interval(g[TIME_COLUMN]) if TIME_COLUMN in g else (math.nan,) * 3
            rows.append({"task": task, "method": method, "metric": col, "n": int(g[col].notna().sum()),
                         "mean": mean, "ci_low": lo, "ci_high": hi, "memory_column": mem_col,
                         "memory_mb": mem, "memory_ci_low": mem_lo, "memory_ci_high": mem_hi,
                         "time_s": sec, "time_ci_low": sec_lo, "time_ci_high": sec_hi,
                         "beaten_by": _beaten_by(wide, str(method), up) if method in wide else []})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    for kind, cost in (("memory", "memory_mb"), ("time", "time_s")):
        dominated = [_dominators(table, r, cost, tolerance) for _, r in table.iterrows()]
        table[f"{kind}_dominated_by"] = [", ".join(d) if d is not None else "(not recorded)" for d in dominated]
        table[f"on_{kind}_front"] = [d is not None and not d for d in dominated]
    table["beaten_by"] = table["beaten_by"].map(", ".join)
    return table


def _dominators(table: pd.DataFrame, row: pd.Series, cost: str, tolerance: float) -> list[str] | None:
    """Methods of the row's task that beat it significantly at lower or equal cost; None when its cost is unknown."""
    if not math.isfinite(row[cost]):
        return None
    same = table[(table["task"] == row["task"]) & table["method"].isin(row["beaten_by"])]
    return [str(r["method"]) for _, r in same.iterrows() if math.isfinite(r[cost]) and r[cost] <= row[cost] * (1 + tolerance)]


def _equals(pool: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    """The rows of ``pool`` whose memory is within ``tolerance`` of its least (the same memory, as the front counts it)."""
    least = float(pool["memory_mb"].min())
    return pool[pool["memory_mb"] <= least * (1 + tolerance)]


def _best_first(rows: pd.DataFrame) -> pd.DataFrame:
    up = higher_is_better(str(rows["metric"].iloc[0]))
    return rows.sort_values(["mean", "memory_mb"], ascending=[not up, True], kind="stable")


def choose(table: pd.DataFrame, task: str, budget_mb: float | None = None,
           tolerance: float = COST_TOLERANCE) -> pd.Series | None:
    """The least-memory method within ``budget_mb`` that no method within the budget beats significantly.

    Methods within ``tolerance`` of that least memory cost the same: of them, the one with the
    best mean (none of them is significantly better, or it would have beaten the others).
    None when nothing fits (or no memory was recorded).
    """
    t = table[(table["task"] == task) & np.isfinite(table["memory_mb"].astype(float))]
    if budget_mb is not None:
        t = t[t["memory_mb"] <= budget_mb]
    if t.empty:
        return None
    inside = set(t["method"])
    unbeaten = t[[not (set(filter(None, b.split(", "))) & inside) for b in t["beaten_by"]]]
    return _best_first(_equals(unbeaten if not unbeaten.empty else t, tolerance)).iloc[0]


def _point(r: pd.Series) -> str:
    ci = f" [{r['ci_low']:.4g}, {r['ci_high']:.4g}]" if math.isfinite(r["ci_low"]) else ""
    return f"{r['metric']} {r['mean']:.4g}{ci}, peak {fmt_mb(r['memory_mb'])}"


def recommendation(table: pd.DataFrame, task: str, budget_mb: float | None = None) -> str:
    """One line: what to run on ``task`` within the budget (or along the whole front), and what it gives up."""
    pick = choose(table, task, budget_mb)
    t = table[table["task"] == task]
    where = f"within {fmt_mb(budget_mb)}" if budget_mb is not None else "at any memory"
    if pick is None:
        known = t[np.isfinite(t["memory_mb"].astype(float))]
        if known.empty:
            return f"{task}: no memory recorded for any method (cells from before cost was measured): no recommendation."
        light = known.sort_values("memory_mb").iloc[0]
        return f"{task}, {where}: no method fits; the lightest, {light['method']}, peaked at {fmt_mb(light['memory_mb'])}."
    line = f"{task}, {where}: {pick['method']} ({_point(pick)})"
    inside = t[np.isfinite(t["memory_mb"].astype(float))]
    if budget_mb is not None:
        inside = inside[inside["memory_mb"] <= budget_mb]
    mem = float(pick["memory_mb"])
    same = [str(r["method"]) for _, r in inside.iterrows()
            if r["method"] != pick["method"] and mem / (1 + COST_TOLERANCE) <= r["memory_mb"] <= mem * (1 + COST_TOLERANCE)
            and pick["method"] not in str(r["beaten_by"]).split(", ")]
    if same:
        line += f"; {_names(same)} {'is' if len(same) == 1 else 'are'} within noise of it at the same memory"
    best = _best_first(inside).iloc[0]
    if best["method"] != pick["method"] and best["method"] not in same:
        line += (f"; {best['method']} has the best mean ({best['mean']:.4g}) but is not significantly better and "
                 f"peaks at {fmt_mb(best['memory_mb'])}")
    front = t[t["on_memory_front"]].sort_values("memory_mb")
    if budget_mb is None and len(front) > 1:
        line += "; front: " + " < ".join(_front_steps(front))
    return line + "."


def _names(methods: list[str]) -> str:
    return ", ".join(methods[:-1]) + f" and {methods[-1]}" if len(methods) > 1 else methods[0]


def _front_steps(front: pd.DataFrame) -> list[str]:
    """The front by memory, methods of the same memory (within the tolerance) named together."""
    steps: list[list[Any]] = []
    for _, r in front.iterrows():
        if steps and r["memory_mb"] <= steps[-1][0] * (1 + COST_TOLERANCE):
            steps[-1][1].append(str(r["method"]))
        else:
            steps.append([float(r["memory_mb"]), [str(r["method"])]])
    return [f"{', '.join(names)} ({fmt_mb(mb)})" for mb, names in steps]


def recommendations(table: pd.DataFrame, budgets_mb: list[float] | None = None) -> list[str]:
    """One line per task and budget (without budgets: one per task, along the whole front)."""
    if table.empty:
        return []
    tasks = list(dict.fromkeys(table["task"]))
    return [recommendation(table, task, b) for task in tasks for b in (budgets_mb or [None])]  # type: ignore[list-item]


def plot_front(table: pd.DataFrame, task: str, kind: str, path: Any) -> Any:
    """Quality against peak memory (``kind="memory"``) or wall time, with both intervals; front methods filled,
    joined by a step line, and named; dominated ones hollow and grey."""
    from spectune._html import figure, save_png

    cost, lo, hi = ("memory_mb", "memory_ci_low", "memory_ci_high") if kind == "memory" else ("time_s", "time_ci_low", "time_ci_high")
    t = table[(table["task"] == task) & np.isfinite(table[cost].astype(float))].sort_values(cost)
    on = t[f"on_{kind}_front"].astype(bool)
    fig, ax = figure((6.4, 4.0), right=0.97)

    def err(center: pd.Series, low: pd.Series, high: pd.Series) -> list[np.ndarray]:
        return [np.nan_to_num((center - low).to_numpy(dtype=float)), np.nan_to_num((high - center).to_numpy(dtype=float))]

    for mask, face, color in ((on, "#234", "#234"), (~on, "none", "#999")):
        s = t[mask]
        ax.errorbar(s[cost], s["mean"], xerr=err(s[cost], s[lo], s[hi]), yerr=err(s["mean"], s["ci_low"], s["ci_high"]),
                    fmt="o", mfc=face, mec=color, ecolor=color, capsize=3, lw=1)
    if on.any():
        ax.step(t[on][cost], t[on]["mean"], where="post", color="#234", lw=0.8, alpha=0.5)
    for _, r in t.iterrows():
        ax.annotate(str(r["method"]), (r[cost], r["mean"]), fontsize=8, xytext=(4, 3), textcoords="offset points",
                    color="#234" if r[f"on_{kind}_front"] else "#777")
    memory_label = "peak GPU memory (MiB)" if t["memory_column"].eq("peak_gpu_memory_mb").all() else "peak resident memory (MiB)"
    ax.set_xlabel(memory_label if kind == "memory" else "wall time per cell (s)")
    ax.set_ylabel(f"{t['metric'].iloc[0]} ({'higher' if higher_is_better(str(t['metric'].iloc[0])) else 'lower'} is better)"
                  if len(t) else "")
    ax.set_title(f"{task}: quality against {'memory' if kind == 'memory' else 'time'} (filled: on the front)")
    ax.grid(alpha=0.3)
    return save_png(fig, path)
