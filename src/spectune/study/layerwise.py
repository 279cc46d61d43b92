"""``layerwise``: which matrices move during fine-tuning, by component and depth, and does it relate to the gap.

Movement is measured from the base weights to the final weights of each cell (the
adapter merged for lightweight methods), per matrix:

- ``rel_weight_change = ||W_end - W_start||_F / ||W_start||_F``;
- ``change_stable_rank = srank(W_end) / srank(W_start) - 1``;
- ``top_share``: how much of the singular-value change sits in the top 10% of the
  spectrum, ``sum_{i <= n/10} |s_i(end) - s_i(start)| / sum_i |s_i(end) - s_i(start)|``
  (singular values in descending order, matched by rank). An update that touches every
  direction alike gives about 0.1 (more where the top values are larger); one aimed at the
  dominant directions gives more. This is how the seed's "FFT modifies all eigenvalues,
  LFT selectively modifies important ones" is measured.

Each cell's table is cached beside its run (``study_movement.parquet``), so the
layer-wise and landscape studies and ``all`` never recompute it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch

from spectune import _io
from spectune.compare.config import CompareConfig
from spectune.compare.grid import Cell
from spectune.study import plots
from spectune.study.cells import BLOCK_TYPES, CellData, describe, matrices
from spectune.study.config import StudyConfig
from spectune.study.part import Part
from spectune.study.stats import spearman_interval
from spectune.study.trajectories import natural_grid

CACHE = "study_movement.parquet"
TOP_FRACTION = 0.1


def matrix_movement(w0: torch.Tensor, w1: torch.Tensor) -> dict[str, float]:
    """Movement of one matrix from ``w0`` to ``w1`` (see the module docstring for the definitions)."""
    a, b = w0.to(torch.float64), w1.to(torch.float64)
    s0 = torch.linalg.svdvals(a)
    s1 = torch.linalg.svdvals(b)
    ds = (s1 - s0).abs()
    k = max(1, math.ceil(TOP_FRACTION * s0.numel()))
    total = float(ds.sum())
    sr0 = float((s0**2).sum() / s0[0] ** 2) if s0[0] > 0 else math.nan
    sr1 = float((s1**2).sum() / s1[0] ** 2) if s1[0] > 0 else math.nan
    return {
        "rel_weight_change": float(torch.linalg.matrix_norm(b - a) / torch.linalg.matrix_norm(a)),
        "stable_rank_start": sr0,
        "stable_rank_end": sr1,
        "change_stable_rank": sr1 / sr0 - 1,
        "top_share": float(ds[:k].sum()) / total if total > 0 else math.nan,
    }


def cell_movement(cd: CellData) -> pd.DataFrame:
    """Movement of every block matrix of one finished cell (cached in the cell's folder)."""
    cache = cd.dir / CACHE
    if cache.exists():
        return pd.read_parquet(cache)
    base, _ = cd.base_model()
    before = matrices(base)
    after = matrices(cd.final_model())
    rows = []
    for name, w1 in after.items():
        info = describe(name)
        if info["module_type"] not in BLOCK_TYPES or name not in before or before[name].shape != w1.shape:
            continue
        rows.append({**info, **matrix_movement(before[name], w1)})
    df = pd.DataFrame(rows)
    df["layer_index"] = df["layer_index"].astype("Int64")
    _io.write_parquet(cache, df)
    return df


def movements(ccfg: CompareConfig, results: pd.DataFrame) -> pd.DataFrame:
    frames = []
    for rec in results[results["status"] == "ok"].to_dict(orient="records"):
        cd = CellData(ccfg, Cell(rec["task"], rec["method"], int(rec["seed"])))
        df = cell_movement(cd)
        for k in ("task", "method", "regime"):
            df[k] = rec[k]
        df["seed"] = int(rec["seed"])
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


VALUES = ["rel_weight_change", "change_stable_rank", "top_share", "stable_rank_end"]


def per_cell(mv: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: mean movement of all / attention / FFN matrices and per block, with its metrics."""
    key = ["task", "method", "regime", "seed"]
    parts = [mv.groupby(key)[VALUES].mean()]
    for grp in ("attention", "ffn"):
        parts.append(mv[mv["group"] == grp].groupby(key)[VALUES].mean().add_prefix(f"{grp}_"))
    layer = mv.pivot_table(index=key, columns="layer_index", values="rel_weight_change", aggfunc="mean")
    layer.columns = [f"layer{int(c)}_rel_weight_change" for c in layer.columns]
    parts.append(layer)
    out = pd.concat(parts, axis=1).reset_index()
    metric_cols = [c for c in results if c.startswith(("test_", "gap_", "train_", "validation_"))]
    return out.merge(results[key + metric_cols], on=key, how="left")


def correlations(cells: pd.DataFrame, gap: str, confidence: float) -> pd.DataFrame:
    """Spearman rho (Fisher interval) of every movement column with the gap, across cells."""
    rows = []
    for col in [c for c in cells if c.endswith(tuple(VALUES))]:
        est = spearman_interval(cells[col], cells[gap], confidence)
        rows.append({"variable": col, "target": gap, **est.as_dict("rho_")})
    return pd.DataFrame(rows)


def run(scfg: StudyConfig, root: Path, out: Path, progress: bool) -> Part:
    ccfg, results = natural_grid(scfg, root, progress)
    mv = movements(ccfg, results)
    part = Part("layerwise", "Layer-wise movement: attention vs feed-forward, by depth",
                "Relative weight change ||W_end - W_start||_F / ||W_start||_F, relative stable-rank change and the "
                "share of the singular-value change in the top 10% of the spectrum, per block matrix, from the base "
                "weights to the final (merged) weights; then, across cells, Spearman correlations of these with the "
                f"generalization gap ({scfg.claims.gap}).")
    part.evidence.update(results=results, compare=ccfg)
    if mv.empty:
        part.intro += " No finished cell to measure."
        return part
    cells = per_cell(mv, results)
    gap = scfg.claims.gap
    corr = correlations(cells, gap, scfg.claims.confidence) if gap in cells else pd.DataFrame()
    summary = (mv.groupby(["task", "method", "group", "layer_index"], as_index=False)[VALUES].mean())
    part.tables.update(movement=mv, movement_per_cell=cells, movement_by_layer=summary, movement_gap_correlation=corr)
    part.shown = ["movement_by_layer", "movement_gap_correlation"]
    part.evidence.update(movement=mv, movement_cells=cells)
    figs = out / "figures"
    d = summary.copy()
    d["series"] = d["method"] + " " + d["group"]
    for col, label in (("rel_weight_change", "||dW||_F / ||W||_F"), ("top_share", "share of |ds| in top 10%")):
        p = plots.lines(d, "layer_index", col, "series", figs / f"layerwise-{col}.png",
                        f"{col} by block (mean over seeds)", "block index", label)
        part.figures.append((f"{col} by block", p))
    if gap in cells:
        p = plots.scatter(cells, "rel_weight_change", gap, "method", figs / "layerwise-movement-vs-gap.png",
                          "movement vs generalization gap (one point per cell)", "mean relative weight change", gap)
        part.figures.append(("movement vs gap", p))
    return part
