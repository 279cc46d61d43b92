"""Seed 001's claims, each turned into one statistic with an interval, and decided by one rule.

Every claim names the study whose output it reads; a claim whose study was not run
is listed as "not evaluated" rather than dropped, so a reader sees what is missing.
The rule (``stats.verdict``, documented in docs/studies.md): the claim is *supported*
when the interval lies wholly on the claimed side of the null, *not supported* when it
lies wholly on the other side, and *inconclusive* otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from spectune.study import plots
from spectune.study.cells import BLOCK_TYPES
from spectune.study.config import StudyConfig
from spectune.study.stats import Estimate, ols_coefficient, spearman_interval, t_interval, verdict

COLUMNS = ["id", "claim", "study", "operationalisation", "estimate", "lo", "hi", "n", "interval", "direction", "null",
           "verdict", "figure", "note"]


@dataclass
class Ctx:
    ev: dict[str, Any]
    cfg: StudyConfig
    figs: Path

    @property
    def conf(self) -> float:
        return self.cfg.claims.confidence

    @property
    def gap(self) -> str:
        return self.cfg.claims.gap


def _row(est: Estimate | None, direction: str, null: float = 0.0, figure: str = "", note: str = "") -> dict[str, Any]:
    if est is None:
        return {"verdict": "not evaluated", "note": note, "direction": direction, "null": null}
    v = verdict(est, direction, null)  # type: ignore[arg-type]
    if v == "inconclusive" and not np.isfinite(est.lo) and est.n < 4:
        note = (note + " " if note else "") + f"too few points for an interval (n={est.n})."
    return {"estimate": est.value, "lo": est.lo, "hi": est.hi, "n": est.n, "interval": est.method,
            "direction": direction, "null": null, "verdict": v, "figure": figure, "note": note}


def _paired(df: pd.DataFrame, value: str) -> tuple[pd.Series, str] | None:
    """Light minus full, matched by task and seed (the first full method against every light one)."""
    if df is None or df.empty or value not in df or df["regime"].nunique() < 2:
        return None
    cell = df.groupby(["task", "method", "regime", "seed"], as_index=False)[value].mean()
    full = cell[cell["regime"] == "full"]
    ref = full["method"].iloc[0]
    light = cell[cell["regime"] == "light"]
    m = light.merge(full[full["method"] == ref], on=["task", "seed"], suffixes=("", "_full"))
    diffs = m[value] - m[f"{value}_full"]
    return diffs, f"{'/'.join(sorted(light['method'].unique()))} minus {ref}"


def _block_cells(ch: pd.DataFrame, value: str) -> pd.DataFrame:
    b = ch[ch["module_type"].isin(BLOCK_TYPES)]
    return b.groupby(["task", "method", "regime", "seed"], as_index=False)[value].mean()


# --- the claims -------------------------------------------------------------------------------


def c1a(x: Ctx) -> dict[str, Any]:
    ch, res = x.ev.get("changes"), x.ev.get("results")
    if ch is None or res is None or x.gap not in res:
        return _row(None, "positive", note="needs the trajectories study")
    cells = _block_cells(ch, "stable_rank_end").merge(res[["task", "method", "seed", x.gap]], on=["task", "method", "seed"])
    fig = plots.scatter(cells, "stable_rank_end", x.gap, "method", x.figs / "claim-1a-stable-rank-vs-gap.png",
                        "final mean stable rank vs gap (one point per cell)", "mean stable rank of block matrices", x.gap)
    return _row(spearman_interval(cells["stable_rank_end"], cells[x.gap], x.conf), "positive", figure=fig.name,
                note="pooled over methods: a method difference in both can drive it.")


def _dose_cells(x: Ctx, arm: str) -> pd.DataFrame | None:
    res = x.ev.get("controlled")
    if res is None:
        return None
    ok = res[(res["status"] == "ok") & ((res["arm"] == arm) | (res["arm"] == "control"))]
    return ok


def c1b(x: Ctx, arm: str) -> dict[str, Any]:
    ok = _dose_cells(x, arm)
    if ok is None or x.gap not in ok:
        return _row(None, "negative", note="needs the controlled study")
    est = spearman_interval(np.log2(ok["dose"].astype(float)), ok[x.gap], x.conf)
    return _row(est, "negative", figure="controlled-gap.png",
                note=f"x = dose on {arm} matrices (higher dose = higher top eigenvalue ratio = lower stable rank).")


def c2(x: Ctx) -> dict[str, Any]:
    ch = x.ev.get("changes")
    got = _paired(_block_cells(ch, "change_stable_rank"), "change_stable_rank") if ch is not None else None
    if got is None:
        return _row(None, "negative", note="needs the trajectories study with a full and a lightweight method")
    diffs, label = got
    return _row(t_interval(diffs.to_numpy(), x.conf), "negative", figure="depth-stable_rank.png",
                note=f"paired difference of mean relative stable-rank change, {label}.")


def c3(x: Ctx, arm: str) -> dict[str, Any]:
    ok, metric = _dose_cells(x, arm), x.ev.get("controlled_metric")
    if ok is None or metric not in ok:
        return _row(None, "negative", note="needs the controlled study")
    higher_better = "perplexity" not in metric and "loss" not in metric
    ok = ok[ok[metric].notna()]
    if ok["dose"].nunique() < 3:
        return _row(None, "negative" if higher_better else "positive", note="needs at least 3 doses")
    d = np.log2(ok["dose"].astype(float).to_numpy())
    est = ols_coefficient(np.column_stack([np.ones_like(d), d, d**2]), ok[metric].to_numpy(), 2, x.conf)
    means = ok.groupby("dose")[metric].mean()
    best = float(means.idxmax() if higher_better else means.idxmin())
    return _row(est, "negative" if higher_better else "positive", figure="controlled-metric.png",
                note=f"quadratic coefficient of {metric} in log2(dose), OLS on cells; best mean at dose {best:g}. "
                     "Concave also when any edit of the pretrained weights hurts (best at dose 1).")


def c4(x: Ctx) -> dict[str, Any]:
    arms = list(x.cfg.controlled.arms)
    res, metric = x.ev.get("controlled"), x.ev.get("controlled_metric")
    if res is None or len(arms) < 2 or metric not in res:
        return _row(None, "nonzero", note="needs the controlled study with two arms")
    frames = []
    for i, arm in enumerate(arms[:2]):
        f = _dose_cells(x, arm)
        frames.append(f.assign(_b=float(i)))  # type: ignore[union-attr]
    both = pd.concat(frames, ignore_index=True)
    both = both[both[metric].notna()]
    d = np.log2(both["dose"].astype(float).to_numpy())
    b = both["_b"].to_numpy()
    design = np.column_stack([np.ones_like(d), d, b, d * b])
    est = ols_coefficient(design, both[metric].to_numpy(), 3, x.conf)
    return _row(est, "nonzero", figure="controlled-metric.png",
                note=f"dose x arm interaction: slope of {metric} in log2(dose), {arms[1]} minus {arms[0]}, OLS on cells "
                     "(the control's cells appear in both arms). A proxy: different slopes mean the two respond "
                     "differently to the ratio; locating optima needs more doses.")


def c5(x: Ctx) -> dict[str, Any]:
    ch = x.ev.get("changes")
    if ch is None:
        return _row(None, "nonzero", note="needs the trajectories study")
    b = ch[ch["module_type"].isin(BLOCK_TYPES) & ch["layer_index"].notna()]
    rhos = [spearman_interval(g["layer_index"].astype(float), g["change_stable_rank"]).value
            for _, g in b.groupby(["task", "method", "seed"])]
    return _row(t_interval(rhos, x.conf), "nonzero", figure="depth-stable_rank.png",
                note="per cell, Spearman of block index with relative stable-rank change; mean over cells.")


def c6(x: Ctx) -> dict[str, Any]:
    cells = x.ev.get("movement_cells")
    if cells is None or x.gap not in cells:
        return _row(None, "nonzero", note="needs the layerwise study")
    cols = [c for c in cells if c.startswith("layer") and c.endswith("_rel_weight_change")]
    if not cols:
        return _row(None, "nonzero", note="no per-layer movement")
    conf = 1 - (1 - x.conf) / len(cols)  # Bonferroni over the layers
    ests = {c: spearman_interval(cells[c], cells[x.gap], conf) for c in cols}
    best = max(ests, key=lambda c: abs(ests[c].value) if np.isfinite(ests[c].value) else -1)
    any_ex = [c for c, e in ests.items() if verdict(e, "nonzero") == "supported"]
    row = _row(ests[best], "nonzero", figure="layerwise-movement-vs-gap.png",
               note=f"the block whose movement correlates most with the gap: {best.split('_')[0]} "
                    f"(Bonferroni over {len(cols)} blocks; {len(any_ex)} exclude 0).")
    return row


def c7(x: Ctx) -> dict[str, Any]:
    mv = x.ev.get("movement")
    got = _paired(mv, "top_share") if mv is not None else None
    if got is None:
        return _row(None, "positive", note="needs the layerwise study with a full and a lightweight method")
    diffs, label = got
    return _row(t_interval(diffs.to_numpy(), x.conf), "positive", figure="layerwise-top_share.png",
                note=f"paired difference of the share of |singular-value change| in the top 10%, {label}.")


def c8(x: Ctx) -> dict[str, Any]:
    share = x.ev.get("early_share")
    if share is None or share.empty:
        return _row(None, "positive", note="needs the trajectories study (at least 3 tracked points per cell)")
    null = float(x.ev.get("lr_share", x.cfg.claims.early_fraction))
    f = x.cfg.claims.early_fraction
    return _row(t_interval(share["early_share"].to_numpy(), x.conf), "positive", null=null,
                figure="trajectory-stable_rank-" + str(share["method"].iloc[0]) + ".png",
                note=f"share of the stable-rank path covered in the first {f:.0%} of steps, against the share of the "
                     f"learning-rate integral spent there ({null:.3f}), which a decaying schedule gives by itself.")


def a1(x: Ctx) -> dict[str, Any]:
    land = x.ev.get("landscape")
    if land is None or x.gap not in land:
        return _row(None, "positive", note="needs the landscape study")
    return _row(spearman_interval(land["hessian_top"], land[x.gap], x.conf), "positive",
                figure="landscape-hessian_top-vs-gap.png", note="pooled over methods.")


def claim_specs(cfg: StudyConfig) -> list[tuple[str, str, str, str, Callable[[Ctx], dict[str, Any]]]]:
    """(id, claim as the seed states it, study, operationalisation, evaluator)."""
    arms = list(cfg.controlled.arms)
    specs: list[tuple[str, str, str, str, Callable[[Ctx], dict[str, Any]]]] = [
        ("1a", "Lower stable rank -> better generalization", "trajectories",
         f"Spearman across cells: final mean stable rank of block matrices vs {cfg.claims.gap} (claimed > 0)", c1a)]
    for arm in arms:
        specs.append((f"1b-{arm}", "Lower stable rank -> better generalization (causal)", "controlled",
                      f"Spearman across cells: log dose on {arm} (lower stable rank) vs {cfg.claims.gap} (claimed < 0)",
                      lambda x, arm=arm: c1b(x, arm)))
    specs.append(("2", "LFT achieves lower stable rank than FFT", "trajectories",
                  "paired (task, seed) difference LFT - FFT of mean relative stable-rank change (claimed < 0)", c2))
    for arm in arms:
        specs.append((f"3-{arm}", "An optimal ratio exists for each layer type", "controlled",
                      f"quadratic coefficient (OLS, t-interval) of the test metric in log2(dose) on {arm} (claimed: concave)",
                      lambda x, arm=arm: c3(x, arm)))
    specs += [
        ("4", "Attention and FFN have different optimal ratios", "controlled",
         "dose x arm interaction of the test metric in log2(dose), OLS t-interval, first two arms (claimed != 0)", c4),
        ("5", "Layer position affects the ratio", "trajectories",
         "mean over cells of Spearman(block index, relative stable-rank change) (claimed != 0)", c5),
        ("6", "Some layers are more important for generalization", "layerwise",
         f"Spearman across cells of each block's weight movement vs {cfg.claims.gap}, Bonferroni (claimed != 0)", c6),
        ("7", "FFT modifies all eigenvalues; LFT selectively modifies important ones", "layerwise",
         "paired LFT - FFT share of singular-value change in the top 10% (claimed > 0)", c7),
        ("8", "The early training phase is crucial for ratio development", "trajectories",
         "share of stable-rank path length in the early steps vs the learning-rate share (claimed >)", c8),
        ("A1", "(additional) Flatter end points generalize better", "landscape",
         f"Spearman across cells: top Hessian eigenvalue vs {cfg.claims.gap} (claimed > 0)", a1),
    ]
    return specs


def evaluate(evidence: dict[str, Any], cfg: StudyConfig, figs: Path) -> pd.DataFrame:
    """The claims table; figures a claim draws itself go to ``figs``."""
    ctx = Ctx(evidence, cfg, figs)
    rows = []
    for cid, claim, study, op, fn in claim_specs(cfg):
        try:
            got = fn(ctx)
        except Exception as err:  # noqa: BLE001 - one claim's missing data must not lose the others
            got = {"verdict": "not evaluated", "note": f"{type(err).__name__}: {err}"}
        rows.append({"id": cid, "claim": claim, "study": study, "operationalisation": op, **got})
    return pd.DataFrame(rows).reindex(columns=COLUMNS)


def to_markdown(df: pd.DataFrame) -> str:
    """A Markdown table of the claims (numbers at 3 significant digits)."""
    cols = ["id", "claim", "operationalisation", "estimate", "lo", "hi", "n", "verdict", "figure", "note"]

    def f(v: Any) -> str:
        if isinstance(v, float):
            return "" if not np.isfinite(v) else f"{v:.3g}"
        return "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).replace("|", "/")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for rec in df.to_dict(orient="records"):
        lines.append("| " + " | ".join(f(rec.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"
