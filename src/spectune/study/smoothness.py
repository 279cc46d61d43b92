"""``landscape``: loss-landscape smoothness at the end of each cell's training.

For every finished cell the final (merged) model is measured on a fixed batch set (the
first ``batches x batch_size`` rows of a split, the same rows for every method of a
seed) with the two pure functions of ``spectune.study.landscape``: the mean loss
increase under random per-matrix perturbations of relative size ``rel_size``, and the
top Hessian eigenvalue by power iteration. Results are cached beside the cell's run
(``study_landscape.json``, keyed by the settings), then related to the gap and to the
final stable rank across cells.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from spectune import _io
from spectune.compare.grid import Cell
from spectune.study import plots
from spectune.study.cells import CellData, landscape_params
from spectune.study.config import LandscapeSection, StudyConfig
from spectune.study.landscape import hessian_top_eigenvalue, perturbation_sharpness
from spectune.study.part import Part
from spectune.study.stats import spearman_interval
from spectune.study.trajectories import natural_grid

CACHE = "study_landscape.json"


def cell_landscape(cd: CellData, sec: LandscapeSection) -> dict[str, Any]:
    """Both smoothness measures of one cell's final model, each cached under the settings it depends on
    (changing ``rel_size`` does not redo the Hessian, changing ``power_iters`` does not redo the draws)."""
    common = {k: v for k, v in sec.model_dump().items() if k in ("batches", "batch_size", "split", "params")}
    keys = {"sharpness": {**common, "rel_size": sec.rel_size, "draws": sec.draws},
            "hessian": {**common, "power_iters": sec.power_iters, "tol": sec.tol}}
    cache = cd.dir / CACHE
    saved: dict[str, Any] = json.loads(cache.read_text()) if cache.exists() else {}
    todo = [m for m in keys if saved.get(m, {}).get("settings") != keys[m]]
    if todo:
        model = cd.final_model()
        batches = cd.batches(sec.split, sec.batches, sec.batch_size)
        names = landscape_params(model, sec.params)
        rows = sum(len(next(iter(b.values()))) for b in batches)
        if "sharpness" in todo:
            sh = perturbation_sharpness(model, batches, rel_size=sec.rel_size, draws=sec.draws, params=names,
                                        seed=cd.cell.seed)
            saved["sharpness"] = {"settings": keys["sharpness"], "values": {
                "base_loss": sh["base_loss"], "sharpness": sh["mean_increase"], "sharpness_std": sh["std_increase"],
                "n_params": sh["n_params"], "rows": rows}}
        if "hessian" in todo:
            with torch.enable_grad():
                top = hessian_top_eigenvalue(model, batches, params=names, iters=sec.power_iters, tol=sec.tol,
                                             seed=cd.cell.seed)
            saved["hessian"] = {"settings": keys["hessian"], "values": {
                "hessian_top": top["eigenvalue"], "hessian_iters": top["iterations"],
                "hessian_converged": top["converged"]}}
        _io.write_json(cache, saved)
    return {**saved["sharpness"]["values"], **saved["hessian"]["values"]}


def run(scfg: StudyConfig, root: Path, out: Path, progress: bool) -> Part:
    ccfg, results = natural_grid(scfg, root, progress)
    sec = scfg.landscape
    part = Part("landscape", "Loss-landscape smoothness at the end of training",
                f"On a fixed set of {sec.batches} x {sec.batch_size} {sec.split} rows: the mean loss increase under "
                f"{sec.draws} random perturbations of each matrix by {sec.rel_size:g} of its Frobenius norm "
                f"(sharpness), and the top Hessian eigenvalue by power iteration ({sec.power_iters} Hessian-vector "
                f"products at most, relative tolerance {sec.tol:g}); parameters: {sec.params}.")
    part.evidence.update(results=results, compare=ccfg)
    rows = []
    key = ["task", "method", "regime", "seed"]
    for rec in results[results["status"] == "ok"].to_dict(orient="records"):
        cd = CellData(ccfg, Cell(rec["task"], rec["method"], int(rec["seed"])))
        rows.append({**{k: rec[k] for k in key}, **cell_landscape(cd, sec)})
    if not rows:
        part.intro += " No finished cell to measure."
        return part
    land = pd.DataFrame(rows)
    metric_cols = [c for c in results if c.startswith(("test_", "gap_"))]
    land = land.merge(results[key + metric_cols], on=key, how="left")
    from spectune.study.layerwise import movements

    mv = movements(ccfg, results)
    if not mv.empty:
        sr = mv.groupby(key)["stable_rank_end"].mean().rename("mean_stable_rank_end").reset_index()
        land = land.merge(sr, on=key, how="left")
    gap = scfg.claims.gap
    corr = []
    for a in ("sharpness", "hessian_top"):
        for b in (gap, "mean_stable_rank_end"):
            if b in land:
                corr.append({"x": a, "y": b, **spearman_interval(land[a], land[b], scfg.claims.confidence).as_dict("rho_")})
    summary = land.groupby(["task", "method"], as_index=False)[["sharpness", "hessian_top", "base_loss"]].mean()
    part.tables.update(landscape=land, landscape_summary=summary, landscape_correlation=pd.DataFrame(corr))
    part.shown = ["landscape", "landscape_correlation"]
    part.evidence["landscape"] = land
    figs = out / "figures"
    for a in ("sharpness", "hessian_top"):
        if gap in land:
            p = plots.scatter(land, a, gap, "method", figs / f"landscape-{a}-vs-gap.png",
                              f"{a} vs {gap} (one point per cell)", a, gap)
            part.figures.append((f"{a} vs gap", p))
    return part
