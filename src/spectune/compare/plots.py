"""A comparison's figures: scores, paired differences, cost, gap, search trials and curves, one PNG each."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spectune._html import figure, save_png
from spectune.compare.pareto import plot_front
from spectune.compare.stats import higher_is_better

COLORS = {"better": "#2a7d2a", "worse": "#b22222", "no clear difference": "#555555", "too few pairs": "#999999"}



def _rows_figure(n: int) -> tuple[Any, Any]:
    """A figure with one row per method; margins fixed in inches so titles and labels fit at any height."""
    h = 0.45 * max(n, 1) + 1.4
    fig, ax = figure((6.4, h), right=0.97)
    fig.subplots_adjust(left=0.3, bottom=0.6 / h, top=1 - 0.4 / h)
    return fig, ax



def plot_scores(df: pd.DataFrame, summary: pd.DataFrame, task: str, path: Path) -> Path:
    """Each method's per-seed scores (dots) and mean with its 95% interval (bar), one row per method."""
    s = summary[summary["task"] == task]
    col = s["metric"].iloc[0]
    fig, ax = _rows_figure(len(s))
    y = np.arange(len(s))[::-1]
    for yi, (_, r) in zip(y, s.iterrows()):
        pts = df[(df["task"] == task) & (df["method"] == r["method"]) & (df["status"] == "ok")][col].dropna()
        ax.scatter(pts, np.full(len(pts), yi), s=14, color="#9ab", zorder=2)
        if math.isfinite(r["ci_low"]):
            ax.plot([r["ci_low"], r["ci_high"]], [yi, yi], color="#234", lw=2, zorder=3)
        ax.scatter([r["mean"]], [yi], marker="D", s=30, color="#234", zorder=4)
    ax.set_yticks(y, list(s["method"]))
    ax.set_ylim(-0.6, len(s) - 0.4)
    ax.set_xlabel(f"{col} ({'higher' if higher_is_better(col) else 'lower'} is better)")
    ax.set_title(f"{task}: mean and 95% interval over seeds")
    ax.grid(axis="x", alpha=0.3)
    return save_png(fig, path)



def plot_differences(pairs: pd.DataFrame, task: str, path: Path) -> Path:
    """Paired difference to the baseline with its interval; colour says which way the interval points."""
    p = pairs[pairs["task"] == task]
    fig, ax = _rows_figure(len(p))
    y = np.arange(len(p))[::-1]
    for yi, (_, r) in zip(y, p.iterrows()):
        c = COLORS.get(r["verdict"], "#555")
        if math.isfinite(r["ci_low"]):
            ax.plot([r["ci_low"], r["ci_high"]], [yi, yi], color=c, lw=2)
        ax.scatter([r["diff"]], [yi], marker="D", s=30, color=c, zorder=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_ylim(-0.6, len(p) - 0.4)
    bases = list(dict.fromkeys(p["baseline"]))
    ax.set_yticks(y, [m if len(bases) == 1 else f"{m}\nvs {b}" for m, b in zip(p["method"], p["baseline"])])
    ax.set_xlabel(f"{p['metric'].iloc[0]}: method - baseline")
    ax.set_title(f"{task}: paired difference to {' / '.join(bases)} (95% interval)")
    ax.grid(axis="x", alpha=0.3)
    return save_png(fig, path)



def plot_cost(summary: pd.DataFrame, task: str, path: Path) -> Path:
    """Score against trainable parameters: what each method buys with its budget."""
    s = summary[(summary["task"] == task) & (summary["trainable_parameters"] > 0)]
    fig, ax = figure((6.4, 4.0), right=0.97)
    ax.errorbar(s["trainable_parameters"], s["mean"], yerr=[s["mean"] - s["ci_low"], s["ci_high"] - s["mean"]],
                fmt="o", color="#234", ecolor="#9ab", capsize=3)
    for _, r in s.iterrows():
        ax.annotate(str(r["method"]), (r["trainable_parameters"], r["mean"]), fontsize=8, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(s["metric"].iloc[0] if len(s) else "")
    ax.set_title(f"{task}: score against trainable parameters")
    ax.grid(alpha=0.3)
    return save_png(fig, path)



def plot_gap(summary: pd.DataFrame, task: str, path: Path) -> Path:
    """Generalization gap (train minus test accuracy; test minus train loss for LM) per method."""
    s = summary[(summary["task"] == task) & summary["gap"].notna()]
    fig, ax = _rows_figure(len(s))
    y = np.arange(len(s))[::-1]
    ax.barh(y, s["gap"], color="#9ab")
    ax.set_yticks(y, list(s["method"]))
    ax.set_xlabel(s["gap_metric"].iloc[0] if len(s) else "gap")
    ax.set_title(f"{task}: generalization gap (mean over seeds)")
    ax.grid(axis="x", alpha=0.3)
    return save_png(fig, path)



def plot_search(trials: pd.DataFrame, task: str, path: Path) -> Path | None:
    """Validation score of every trial against its learning rate, one colour per method, chosen ones ringed."""
    t = trials[(trials["task"] == task) & trials["state"].isin(["COMPLETE", "PRUNED"])]
    if t.empty or "param:train.lr" not in t:
        return None
    fig, ax = figure((6.4, 3.8), right=0.72)
    for i, (method, g) in enumerate(t.groupby("method", sort=False)):
        color = f"C{i % 10}"
        done = g[g["state"] == "COMPLETE"]
        ax.scatter(done["param:train.lr"], done["value"], color=color, s=22, label=method)
        cut = g[g["state"] == "PRUNED"]
        if not cut.empty:
            ax.scatter(cut["param:train.lr"], cut["value"], facecolors="none", edgecolors=color, s=22)
        if "chosen" in g and g["chosen"].any():
            best = g[g["chosen"]]
            ax.scatter(best["param:train.lr"], best["value"], s=110, facecolors="none", edgecolors="k", lw=1.2)
    ax.set_xscale("log")
    ax.set_xlabel("base learning rate (train.lr)")
    ax.set_ylabel("validation score (mean over search seeds)")
    ax.set_title(f"{task}: search trials (hollow: pruned, ringed: chosen)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return save_png(fig, path)



def plot_curve(curve: pd.DataFrame, what: str, path: Path) -> Path:
    """Paired difference (method - its baseline) against the curve's x, one panel per method, a line per family."""
    methods = list(dict.fromkeys(curve["method"]))
    fig, axes = figure((4.2 * len(methods), 3.4), ncols=len(methods), right=0.98)
    axes = np.atleast_1d(axes)
    for ax, method in zip(axes, methods):
        m = curve[curve["method"] == method]
        for i, (fam, g) in enumerate(m.groupby("family", sort=True)):
            c = f"C{i % 10}"
            ok = g["ci_low"].notna()
            ax.errorbar(g["x"][ok], g["diff"][ok], yerr=[g["diff"][ok] - g["ci_low"][ok], g["ci_high"][ok] - g["diff"][ok]],
                        color=c, marker="o", capsize=3, label=fam)
            ax.plot(g["x"], g["diff"], color=c, alpha=0.4)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(m["x"])), [str(v) for v in sorted(set(m["x"]))])
        ax.set_xlabel(what)
        ax.set_title(f"{method} vs {m['baseline'].iloc[0]}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    axes[0].set_ylabel("paired difference (95% interval)")
    return save_png(fig, path)



def task_figures(df: pd.DataFrame, tables: dict[str, pd.DataFrame], task: str, plots: Path) -> list[tuple[str, Path]]:
    """A task's figures: scores, differences, quality against memory and time, trainable parameters, gap."""
    summary, pairs, front = tables["summary"], tables["paired"], tables.get("front", pd.DataFrame())
    figs = [("scores", plot_scores(df, summary, task, plots / f"{task}_scores.png"))]
    if not pairs.empty and (pairs["task"] == task).any():
        figs.append(("differences", plot_differences(pairs, task, plots / f"{task}_differences.png")))
    mine = front[front["task"] == task] if not front.empty else front
    for kind, cost in (("memory", "memory_mb"), ("time", "time_s")):
        if not mine.empty and np.isfinite(mine[cost].astype(float)).any():
            figs.append((kind, plot_front(front, task, kind, plots / f"{task}_{kind}.png")))
    if (summary[summary["task"] == task]["trainable_parameters"] > 0).any():
        figs.append(("cost", plot_cost(summary, task, plots / f"{task}_cost.png")))
    if summary[summary["task"] == task]["gap"].notna().any():
        figs.append(("gap", plot_gap(summary, task, plots / f"{task}_gap.png")))
    return figs
