"""Statistics of a comparison: per-method intervals and paired differences against the baseline.

Pure functions over the tidy results table (one row per task x method x seed).
Cells of different methods with the same task and seed saw the same training rows
(the seed fixes the data subsample), so differences are paired by seed, which
removes the between-seed variance that dominates low-data fine-tuning.

- interval: Student t, ``mean +- t_{0.975, n-1} * sd / sqrt(n)``;
- paired test: ``scipy.stats.ttest_rel``, and the Wilcoxon signed-rank test when
  there are at least 6 pairs (below that it cannot reach p < 0.05);
- several methods are compared with a baseline, so p-values are also given
  adjusted by Benjamini-Hochberg over the comparisons of each task;
- a verdict reads the interval: ``better`` when it lies wholly on the good side of
  0, ``worse`` on the bad side, ``no clear difference`` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from spectune.compare.config import METRIC_DIRECTION

CONFIDENCE = 0.95
MIN_WILCOXON = 6


def metric_column(task_type: str | None, metric: str = "auto") -> str:
    """The results column a task is ranked by: ``test_<metric>``."""
    if metric == "auto":
        metric = "perplexity" if task_type == "causal_lm" else "accuracy"
    return f"test_{metric}"


def higher_is_better(column: str) -> bool:
    base = column.split("_", 1)[1] if column.startswith(("test_", "validation_", "train_")) else column
    if base not in METRIC_DIRECTION:
        raise KeyError(f"no known direction for metric {column!r}; known: {', '.join(METRIC_DIRECTION)}")
    return METRIC_DIRECTION[base]


def t_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high); a single value has no interval (NaN bounds)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"] if "status" in df else df


def task_metrics(df: pd.DataFrame, metric: str = "auto") -> dict[str, str]:
    """Task name -> the column it is ranked by."""
    out = {}
    for task, part in _ok(df).groupby("task", sort=False):
        types = part["task_type"].dropna().unique() if "task_type" in part else []
        out[str(task)] = metric_column(types[0] if len(types) else None, metric)
    return out


def summarize(df: pd.DataFrame, metric: str = "auto") -> pd.DataFrame:
    """Per task and method: the ranked metric's mean and 95% interval, the gap and the costs."""
    rows = []
    ok = _ok(df)
    for task, col in task_metrics(df, metric).items():
        for method, part in ok[ok["task"] == task].groupby("method", sort=False):
            mean, lo, hi = t_interval(part[col].to_numpy()) if col in part else (math.nan,) * 3
            gap = [c for c in ("gap_accuracy", "gap_loss") if c in part and part[c].notna().any()]
            rows.append({
                "task": task, "method": method, "metric": col, "n": int(part[col].notna().sum()) if col in part else 0,
                "mean": mean, "ci_low": lo, "ci_high": hi,
                "sd": float(part[col].std(ddof=1)) if col in part and len(part) > 1 else math.nan,
                "validation_mean": float(part[col.replace("test_", "validation_", 1)].mean())
                if col.replace("test_", "validation_", 1) in part else math.nan,
                "gap": float(part[gap[0]].mean()) if gap else math.nan, "gap_metric": gap[0] if gap else "",
                **cost_summary(part),
            })
    return pd.DataFrame(rows)


# costs that vary from seed to seed get an interval; sizes fixed by the method get their mean
INTERVAL_COSTS = ("peak_memory_mb", "peak_gpu_memory_mb", "seconds_per_step", "wall_time_s")
MEAN_COSTS = ("mean_lr_scale", "trainable_parameters", "trainable_parameters_active", "optimizer_state_parameters",
              "optimizer_state_mb")


def cost_summary(part: pd.DataFrame) -> dict[str, float]:
    """A method's costs over its seeds: mean and 95% interval (``<cost>_ci_low/high``) of the measured ones,
    the mean of the sizes; NaN where no cell recorded it (runs from before it was measured)."""
    out: dict[str, float] = {}
    for c in MEAN_COSTS + INTERVAL_COSTS:
        values = pd.to_numeric(part[c], errors="coerce").to_numpy(dtype=float) if c in part else np.array([])
        mean, lo, hi = t_interval(values)
        out[c] = mean
        if c in INTERVAL_COSTS:
            out[f"{c}_ci_low"], out[f"{c}_ci_high"] = lo, hi
    return out


def verdict(low: float, high: float, higher_better: bool) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "too few pairs"
    if low > 0:
        return "better" if higher_better else "worse"
    if high < 0:
        return "worse" if higher_better else "better"
    return "no clear difference"


def bh_adjusted(p_values: Any) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (scipy); NaN (no test possible) stays NaN and is not counted."""
    ps = np.asarray(p_values, dtype=float)
    adj = np.full_like(ps, np.nan)
    finite = np.isfinite(ps)
    if finite.any():
        adj[finite] = stats.false_discovery_control(ps[finite])
    return adj


def per_task(df: pd.DataFrame, metric: str = "auto") -> Iterator[tuple[str, str, pd.DataFrame, pd.DataFrame]]:
    """(task, its ranked column, its finished cells, the column pivoted to seed x method) for each task that has it."""
    ok = _ok(df)
    for task, col in task_metrics(df, metric).items():
        part = ok[ok["task"] == task]
        if col in part:
            yield task, col, part, part.pivot_table(index="seed", columns="method", values=col, aggfunc="first")


def paired(df: pd.DataFrame, baseline: str | dict[str, str | None], metric: str = "auto",
           tie_tolerance: float = 0.0) -> pd.DataFrame:
    """Every method against its baseline per task, over the seeds both finished.

    ``baseline`` is one method for all, or a mapping method -> its baseline (None:
    not compared). ``diff`` is method minus baseline in the metric's own units;
    ``wins`` count seeds where the method is better by more than ``tie_tolerance``.
    """
    rows = []
    for task, col, part, wide in per_task(df, metric):
        up = higher_is_better(col)
        task_rows = []
        for method in part["method"].unique():
            base = baseline.get(method) if isinstance(baseline, dict) else (baseline if method != baseline else None)
            if base is None or base not in wide or method not in wide:
                continue
            pair = wide[[base, method]].dropna()
            d = (pair[method] - pair[base]).to_numpy(dtype=float)
            mean, lo, hi = t_interval(d)
            better = d > tie_tolerance if up else d < -tie_tolerance
            worse = d < -tie_tolerance if up else d > tie_tolerance
            p_t = float(stats.ttest_rel(pair[method], pair[base]).pvalue) if len(d) >= 2 and np.any(d != d[0]) else math.nan
            p_w = math.nan
            if len(d) >= MIN_WILCOXON and np.any(d != 0):
                p_w = float(stats.wilcoxon(d).pvalue)
            task_rows.append({
                "task": task, "method": method, "baseline": base, "metric": col, "pairs": len(d),
                "diff": mean, "ci_low": lo, "ci_high": hi, "p_ttest": p_t, "p_wilcoxon": p_w,
                "wins": int(better.sum()), "ties": int(len(d) - better.sum() - worse.sum()), "losses": int(worse.sum()),
                "verdict": verdict(lo, hi, up),
            })
        adj = bh_adjusted([r["p_ttest"] for r in task_rows])
        for r, a in zip(task_rows, adj):
            r["p_adjusted"] = float(a)
        rows += task_rows
    return pd.DataFrame(rows)


def win_tie_loss(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per method, summed over tasks: how often it beat, tied and lost to the baseline."""
    if pairs.empty:
        return pd.DataFrame(columns=["method", "wins", "ties", "losses", "tasks_better", "tasks_worse"])
    g = pairs.groupby("method", sort=False)
    return pd.DataFrame({
        "wins": g["wins"].sum(), "ties": g["ties"].sum(), "losses": g["losses"].sum(),
        "tasks_better": g["verdict"].apply(lambda v: int((v == "better").sum())),
        "tasks_worse": g["verdict"].apply(lambda v: int((v == "worse").sum())),
    }).reset_index()
