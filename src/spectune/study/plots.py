"""The study's figures, drawn with spectune._html's pyplot-free figures (headless, nothing leaks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spectune._html import figure, save_png

MARKERS = "osD^v<>ph*"


def lines(df: pd.DataFrame, x: str, y: str, by: str, path: Path, title: str, xlabel: str, ylabel: str,
          lo: str | None = None, hi: str | None = None, style_by: str | None = None, logx: bool = False,
          hline: float | None = None) -> Path:
    """One line per value of ``by`` (and a line style per value of ``style_by``), optional interval band."""
    fig, ax = figure((6.4, 4.0), right=0.74)
    styles = ["-", "--", ":", "-."]
    style_keys = list(dict.fromkeys(df[style_by])) if style_by else [None]
    colors = {k: f"C{i % 10}" for i, k in enumerate(dict.fromkeys(df[by]))}
    for si, sk in enumerate(style_keys):
        part = df if sk is None else df[df[style_by] == sk]
        for i, (key, g) in enumerate(part.groupby(by, sort=False)):
            g = g.sort_values(x)
            label = f"{key}" if sk is None else f"{sk}: {key}"
            ax.plot(g[x], g[y], styles[si % 4], marker=MARKERS[i % len(MARKERS)], ms=3, color=colors[key], label=label)
            if lo and hi and g[lo].notna().any():
                ax.fill_between(g[x], g[lo], g[hi], color=colors[key], alpha=0.15)
    if hline is not None:
        ax.axhline(hline, color="#888", lw=0.8)
    return _finish(fig, ax, path, title, xlabel, ylabel, logx)


def errorbars(df: pd.DataFrame, x: str, y: str, lo: str, hi: str, by: str, path: Path, title: str,
              xlabel: str, ylabel: str, points: pd.DataFrame | None = None, py: str | None = None,
              logx: bool = False) -> Path:
    """Means with intervals per ``x`` (one series per ``by``), the individual cells as faint dots."""
    fig, ax = figure((6.0, 4.0), right=0.78)
    keys = list(dict.fromkeys(df[by]))
    width = 0.04 * (len(keys) - 1)
    for i, key in enumerate(keys):
        g = df[df[by] == key].sort_values(x)
        shift = (2.0 ** ((i - (len(keys) - 1) / 2) * 0.04)) if logx else (i - (len(keys) - 1) / 2) * width
        xs = g[x] * shift if logx else g[x] + shift
        err = np.vstack([g[y] - g[lo], g[hi] - g[y]])
        err = np.where(np.isfinite(err), err, 0.0)
        ax.errorbar(xs, g[y], yerr=err, fmt="-o", ms=4, capsize=3, color=f"C{i}", label=str(key))
        if points is not None and py is not None:
            p = points[points[by] == key]
            px = p[x] * shift if logx else p[x] + shift
            ax.plot(px, p[py], ".", color=f"C{i}", alpha=0.35)
    return _finish(fig, ax, path, title, xlabel, ylabel, logx)


def scatter(df: pd.DataFrame, x: str, y: str, by: str, path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    """Cells as points coloured by ``by`` (method, arm): the picture behind a correlation claim."""
    fig, ax = figure((5.6, 4.0), right=0.74)
    for i, (key, g) in enumerate(df.groupby(by, sort=False)):
        ax.plot(g[x], g[y], MARKERS[i % len(MARKERS)], color=f"C{i}", label=str(key), alpha=0.8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save_png(fig, path)


def _finish(fig: Any, ax: Any, path: Path, title: str, xlabel: str, ylabel: str, logx: bool) -> Path:
    """The furniture every study plot shares: log2 x when asked, labels, a legend outside, saved."""
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save_png(fig, path)
