"""Plots and a single-file HTML report of an analysis (shared page pieces live in ``spectune._html``)."""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator, NullFormatter

from spectune import _io
from spectune._html import page, figure as _figure, gallery as _gallery, save_png as _save, table as _table
from spectune.analyze.result import COLUMNS, KEY_METRICS, AnalysisResult

EsdMode = Literal["all", "summary", "none"]
# "summary" mode stays readable (and the HTML a few MB at most) on models with hundreds of matrices
MAX_SUMMARY_ESD = 40
_OWN_PLOTS = ("esd_*.png", "depth_*.png")


# -- plots ----------------------------------------------------------------------------


def plot_esd(name: str, lam: np.ndarray, row: Mapping[str, Any], path: str | Path) -> Path:
    """Eigenvalue density of one matrix on log-log axes, with the fits its metrics came from.

    Drawn: a density histogram over log-spaced bins; the KS-chosen power law
    p(lambda) = C lambda^-alpha for lambda >= xmin, normalised so its area equals
    the share of eigenvalues in the tail (the continuous pdf the Hill estimator
    fits, times n_tail / n), so it should lie on the histogram's tail, with the band
    the exponents of its 95% interval span and its flags; the Marchenko-Pastur bulk
    edge; and the median-xmin Hill alpha with its interval in the legend.
    Missing fits (NaN) are left out rather than drawn wrong.
    """
    lam = np.asarray(lam, dtype=np.float64)
    pos = lam[lam > 0]
    fig, ax = _figure((6.0, 4.0))
    if pos.size == 0:
        ax.text(0.5, 0.5, "no positive eigenvalues", ha="center", va="center", transform=ax.transAxes)
    else:
        lo, hi = float(pos.min()), float(pos.max())
        if hi <= lo:  # one distinct value: give the bin some width
            lo, hi = lo / 1.5, hi * 1.5
        n_bins = int(np.clip(2 * math.sqrt(pos.size), 10, 100))
        bins = np.logspace(math.log10(lo), math.log10(hi), n_bins + 1)
        bins[0], bins[-1] = lo, hi  # 10**log10(x) can miss x by an ulp and drop the extreme eigenvalues
        density, edges = np.histogram(pos, bins=bins, density=True)
        # bars for the non-empty bins only: an empty bin has no place on a log density axis
        nz = density > 0
        label = f"ESD ({pos.size} eigenvalues)"
        ax.bar(edges[:-1][nz], density[nz], np.diff(edges)[nz], align="edge", alpha=0.45, label=label)

        _draw_tail(ax, pos, row, hi)

        edge = _num(row, "mp_bulk_max")
        if math.isfinite(edge) and edge > 0:
            spikes = _num(row, "num_spikes")
            extra = f", {int(spikes)} spikes above" if math.isfinite(spikes) else ""
            ax.axvline(edge, color="tab:green", ls="--", lw=1.5, label=f"MP bulk edge {edge:.3g}{extra}")

    hill = _num(row, "alpha_hill")
    hill_text = f"{hill:.3g}" if math.isfinite(hill) else "n/a"
    h_lo, h_hi = _num(row, "alpha_hill_lo"), _num(row, "alpha_hill_hi")
    if math.isfinite(hill) and math.isfinite(h_lo) and math.isfinite(h_hi):
        hill_text += f" [{h_lo:.3g}, {h_hi:.3g}]"
    ax.plot([], [], " ", label=f"Hill alpha (median xmin) = {hill_text}")
    if pos.size:
        _log_axes(ax)
    ax.set_xlabel("eigenvalue lambda = s^2 of W^T W")
    ax.set_ylabel("density")
    status = str(row.get("status", ""))
    # parse_math off: a tensor name is printed as it is ('$' would start matplotlib's mathtext)
    ax.set_title(_shorten(name, 70) + ("" if status in ("ok", "") else f"  [{status}]"), fontsize=9, parse_math=False)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def tail_band(x: np.ndarray, xmin: float, tail_share: float, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest fitted tail density at each x over the exponents in [lo, hi].

    The density tail_share (a - 1) / xmin (x / xmin)^-a is not monotone in a (it peaks at
    a = 1 + 1 / ln(x / xmin)), so the band is taken over a grid of exponents, ends included.
    """
    grid = np.linspace(max(lo, 1.0 + 1e-9), hi, 41)[:, None]
    y = tail_share * (grid - 1) / xmin * (x[None, :] / xmin) ** -grid
    return y.min(axis=0), y.max(axis=0)


def _draw_tail(ax: Any, pos: np.ndarray, row: Mapping[str, Any], top: float) -> None:
    """The KS-fitted power law above its xmin, its 95% band and its flags (nothing when there is no fit)."""
    alpha, xmin = _num(row, "alpha"), _num(row, "alpha_xmin")
    if not (math.isfinite(alpha) and alpha > 1 and math.isfinite(xmin) and xmin > 0):
        return
    tail_share = np.count_nonzero(pos >= xmin) / pos.size
    x = np.logspace(math.log10(xmin), math.log10(max(top, xmin * 1.01)), 50)
    y = tail_share * (alpha - 1) / xmin * (x / xmin) ** -alpha
    flags = str(row.get("alpha_flags") or "") if not isinstance(row.get("alpha_flags"), float) else ""
    ax.plot(x, y, color="tab:red", lw=2, label=f"power law alpha={alpha:.3g} (KS xmin={xmin:.3g})"
            + (f" [{flags}]" if flags else ""))
    lo, hi = _num(row, "alpha_lo"), _num(row, "alpha_hi")
    if math.isfinite(lo) and math.isfinite(hi) and hi > lo:
        band_lo, band_hi = tail_band(x, xmin, tail_share, lo, hi)
        ax.fill_between(x, band_lo, band_hi, color="tab:red", alpha=0.2, lw=0,
                        label=f"95% interval of alpha [{lo:.3g}, {hi:.3g}]")
    ax.axvline(xmin, color="tab:red", ls=":", lw=1)


def plot_depth(metrics_df: pd.DataFrame, metric: str, path: str | Path) -> Path:
    """``metric`` against block index, one line per module type: trends with depth at a glance.

    Only matrices with status ok inside a numbered block are drawn; other rows
    have either no fit or no depth.
    """
    data = _depth_data(metrics_df, metric)
    fig, ax = _figure((7.0, 3.6), right=0.8)  # room for the legend on the right
    if data.empty:
        ax.text(0.5, 0.5, f"no finite {metric} in numbered blocks", ha="center", va="center", transform=ax.transAxes)
    for kind, part in data.groupby("module_type", sort=True):
        part = part.sort_values("layer_index")
        ax.plot(part["layer_index"], part["value"], marker="o", ms=4, lw=1.2, label=str(kind))
    ax.set_xlabel("layer_index (block)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by depth", fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if not data.empty:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def _depth_data(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """(module_type, layer_index, value) of ok rows in a block with a finite ``metric``."""
    rows = df[(df["status"] == "ok") & df["layer_index"].notna()]
    value = pd.to_numeric(rows[metric], errors="coerce").astype(float)
    out = pd.DataFrame(
        {"module_type": rows["module_type"], "layer_index": rows["layer_index"].astype(float), "value": value}
    )
    return out[np.isfinite(out["value"])]


def _log_axes(ax: Any) -> None:
    """Log-log axes labelled at powers of ten only (minor labels collide on short ranges).

    An axis spanning less than two labelled decades is widened to whole decades,
    so every plot keeps at least two readable tick labels per axis.
    """
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis, get, set_ in ((ax.xaxis, ax.get_xlim, ax.set_xlim), (ax.yaxis, ax.get_ylim, ax.set_ylim)):
        lo, hi = get()
        if math.floor(math.log10(hi)) - math.ceil(math.log10(lo)) < 1:
            set_(10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi)))
        axis.set_minor_formatter(NullFormatter())








# -- which spectra to draw ------------------------------------------------------------


def esd_names(result: AnalysisResult, esd: EsdMode = "summary") -> list[str]:
    """Matrices whose ESD the report draws, in table order.

    ``summary`` keeps, per module type, the first, middle and last block (where
    depth trends show), then fills up with matrices outside the blocks
    (embeddings, lm_head, other) up to MAX_SUMMARY_ESD.
    """
    if esd not in ("all", "summary", "none"):
        raise ValueError(f"esd must be 'all', 'summary' or 'none', not {esd!r}")
    df = result.metrics
    df = df[df["name"].isin(result.spectra.keys())]
    if esd == "none":
        return []
    if esd == "all":
        return list(df["name"])
    in_block = df[df["layer_index"].notna()]
    picked: list[str] = []
    for _, part in in_block.groupby("module_type", sort=True):
        blocks = sorted(part["layer_index"].unique())
        for b in dict.fromkeys([blocks[0], blocks[len(blocks) // 2], blocks[-1]]):
            picked.append(part.loc[part["layer_index"] == b, "name"].iloc[0])
    picked = picked[:MAX_SUMMARY_ESD]
    for name in df.loc[df["layer_index"].isna(), "name"]:
        if len(picked) >= MAX_SUMMARY_ESD:
            break
        picked.append(name)
    keep = set(picked)
    return [n for n in df["name"] if n in keep]


# -- the report -----------------------------------------------------------------------


def write_report(result: AnalysisResult, out_dir: str | Path, esd: EsdMode = "summary") -> Path:
    """Write ``out_dir/plots/*.png`` and a self-contained ``out_dir/report.html``; return the HTML path.

    Plots left in ``plots/`` by an earlier report (our own ``esd_*``/``depth_*``
    names) that this run did not redraw are removed, so the folder always
    matches the HTML.
    """
    names = esd_names(result, esd)  # validates esd before anything is written
    out = Path(out_dir)
    plots = out / "plots"
    df = result.metrics

    depth: list[tuple[str, Path]] = []
    for metric in KEY_METRICS:
        if metric in df and not _depth_data(df, metric).empty:
            depth.append((metric, plot_depth(df, metric, plots / f"depth_{_safe(metric)}.png")))

    rows = df.set_index("name", drop=False)
    spectra: list[tuple[str, Path]] = []
    for i, name in enumerate(names):
        path = plots / f"esd_{i:03d}_{_safe(name)}.png"
        spectra.append((name, plot_esd(name, result.spectra[name], rows.loc[name], path)))

    written = {p for _, p in depth + spectra}
    for pattern in _OWN_PLOTS:
        for stale in plots.glob(pattern):
            if stale not in written:
                stale.unlink()

    return _io.write_text(out / "report.html", _html(result, depth, spectra, esd))


def _html(
    result: AnalysisResult, depth: list[tuple[str, Path]], spectra: list[tuple[str, Path]], esd: str
) -> str:
    summary = result.summary()
    model = dict(summary["model"])
    counts = model.pop("status_counts", {})
    flag_counts = model.pop("alpha_flags", {})
    df = result.metrics
    bad = df[df["status"] != "ok"]
    esc = html.escape
    source = result.source or "(in-memory model)"

    parts = [
        "<h2>Model summary</h2>",
        _table(pd.DataFrame({"quantity": list(model), "value": list(model.values())})),
        "<h2>Matrix status</h2>",
        "<p>" + ", ".join(f"<b>{esc(str(s))}</b>: {n}" for s, n in counts.items()) + "</p>",
    ]
    if bad.empty:
        parts.append(f"<p>All {len(df)} matrices have status ok.</p>")
    else:
        what = "1 matrix is" if len(bad) == 1 else f"{len(bad)} matrices are"
        parts.append(f"<p class=warn>{what} not ok; their fits are missing or partial:</p>")
        parts.append(_table(bad[["name", "module_type", "layer_index", "rows", "cols", "status", "note"]], flag=True))
    if flag_counts:
        parts += [
            f"<h2>Alpha fits</h2><p>Matrices (status ok) whose fit carries each flag; intervals: "
            f"{esc(str(model.get('alpha_uncertainty', '')))} (docs/metrics.md, uncertainty of alpha).</p>",
            _table(pd.DataFrame([{"alpha column": c, **v} for c, v in flag_counts.items()])),
        ]
    parts += [
        "<h2>By module type</h2><p>Means over matrices with status ok.</p>",
        _table(result.by_module_type()),
        "<h2>By block</h2><p>Means over matrices with status ok.</p>",
        _table(result.by_block()),
        "<h2>Metrics by depth</h2>",
        _gallery(depth, "depth") if depth else "<p>No numbered blocks with finite key metrics.</p>",
        f"<h2>Eigenvalue spectra (esd={esc(esd)}, {len(spectra)} plots)</h2>",
        "<p>Histogram of eigenvalues of W<sup>T</sup>W; red: power law fitted above the KS-chosen xmin "
        "(dotted), shaded over the 95% interval of its alpha, flags in brackets; green dashed: "
        "Marchenko-Pastur bulk edge.</p>",
        _gallery(spectra, "esd") if spectra else "<p>No ESD plots in this report.</p>",
        "<h2>All matrices</h2>",
        _table(df[[c for c in COLUMNS if c in df]], flag=True),
        "<h2>Run</h2>",
        "<details><summary>config and timings</summary><pre>"
        + esc(json.dumps(_io.to_jsonable({"config": result.config, "timings": result.timings}), indent=2))
        + "</pre></details>",
    ]
    return page("spectune report", parts, subtitle=source)











def _num(row: Mapping[str, Any], key: str) -> float:
    """``row[key]`` as a float, NaN when missing or not a number (pd.NA, None)."""
    try:
        v = row.get(key)
        return float(v) if v is not None and v is not pd.NA else math.nan
    except (TypeError, ValueError):
        return math.nan


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120]


def _shorten(text: str, n: int) -> str:
    return text if len(text) <= n else "..." + text[-(n - 3) :]
